"""Dataset loading (spec environments.md §1 "Datasets"): folders, splits, checksums, parsers, downloads.

Generated IDX / pickle files exercise the parsing and checksum paths; real MNIST
test images (``mnist_dir``: the shipped subset ``tests/data/mnist``, or the full
split via ``PLASTICITY_TEST_MNIST``) check real files. Nothing downloads:
``_fetch`` is replaced by a local stand-in wherever a download path is tested.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from envs import datasets
from envs.datasets import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    DATASETS,
    SUBSET_MANIFEST,
    class_balanced_subset,
    load_dataset,
    parse_cifar_batch,
    parse_idx,
    read_idx_gz,
    verify_md5,
)

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
SHIPPED_MNIST = Path(__file__).resolve().parent / "data" / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def expected_mnist(folder: Path) -> tuple[int, list[int]]:
    """Image count and per-class counts of the MNIST test files in ``folder``: a subset's manifest, else the full split."""
    manifest = Path(folder) / SUBSET_MANIFEST
    if manifest.is_file():
        listed = json.loads(manifest.read_text())
        return listed["num_images"], listed["label_counts"]
    return 10_000, MNIST_TEST_LABEL_COUNTS


@pytest.fixture(autouse=True)
def _no_network_and_no_user_folders(monkeypatch, tmp_path):
    """No test may download, or read the user's real data folder or cache."""

    def fail_fetch(url, destination):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(datasets, "_fetch", fail_fetch)
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)
    monkeypatch.delenv(datasets.NO_DOWNLOAD_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------
# The shipped MNIST test subset (tests/data/mnist) and subset manifests
# ---------------------------------------------------------------------------
def load_make_subset_script():
    spec = importlib.util.spec_from_file_location("make_mnist_subset", SHIPPED_MNIST.parent / "make_mnist_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_subset_is_the_documented_selection_with_reproducible_bytes():
    manifest = json.loads((SHIPPED_MNIST / SUBSET_MANIFEST).read_text())
    assert manifest["dataset"] == "mnist" and manifest["split"] == "test"
    assert manifest["num_images"] == 2000 and manifest["label_counts"] == [200] * 10
    assert "CC BY-SA 3.0" in manifest["licence"] and "yann.lecun.com/exdb/mnist" in manifest["source"]
    assert sorted(manifest["md5"]) == sorted(MNIST_FILES)
    readme = (SHIPPED_MNIST / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "LeCun" in readme and "Cortes" in readme and "Burges" in readme
    # Not the canonical files: the sums come from the manifest.
    for file in MNIST_FILES:
        assert manifest["md5"][file] == md5((SHIPPED_MNIST / file).read_bytes()) != datasets.SOURCES["mnist"].md5[file]
    assert sum(f.stat().st_size for f in SHIPPED_MNIST.iterdir()) < 400_000

    images, labels = load_dataset("mnist", data_dir=SHIPPED_MNIST, download=False)
    assert images.shape == (2000, 1, 28, 28) and torch.bincount(labels).tolist() == [200] * 10
    assert int(labels[0]) == 7  # the test set's first image comes first: file order is kept
    assert images.reshape(2000, -1).unique(dim=0).shape[0] >= 1990  # real, distinct digits

    # The script's rule and encoding: the first k of each class in file order (so the rule
    # applied to the subset keeps it whole), gzip with mtime=0 (rebuilding gives the same bytes).
    script = load_make_subset_script()
    raw = labels.numpy().astype(np.uint8)
    assert np.array_equal(script.select(raw, 200), np.arange(2000))
    first_ten = script.select(raw, 10)
    assert np.bincount(raw[first_ten]).tolist() == [10] * 10
    assert all(np.flatnonzero(raw == k)[:10].tolist() == [i for i in first_ten if raw[i] == k] for k in range(10))
    assert script.idx_gz_bytes(images[:, 0].numpy()) == (SHIPPED_MNIST / MNIST_FILES[0]).read_bytes()
    assert script.idx_gz_bytes(raw) == (SHIPPED_MNIST / MNIST_FILES[1]).read_bytes()


def copy_of_shipped_subset(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist"
    shutil.copytree(SHIPPED_MNIST, folder)
    return folder


def test_a_changed_subset_file_is_a_clear_error_naming_it_and_its_manifest(tmp_path):
    folder = copy_of_shipped_subset(tmp_path)
    path = folder / MNIST_FILES[0]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError) as error:
        load_dataset("mnist", data_dir=folder, download=False)
    message = str(error.value)
    assert str(path) in message and str(folder / SUBSET_MANIFEST) in message and "md5" in message

    # Without its manifest the subset is checked against the canonical sums, and fails.
    folder = copy_of_shipped_subset(tmp_path / "b")
    (folder / SUBSET_MANIFEST).unlink()
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*not the canonical one"):
        load_dataset("mnist", data_dir=folder, download=False)


def test_a_subset_manifest_applies_only_to_its_dataset_and_explicit_checksums_win(tmp_path):
    folder = copy_of_shipped_subset(tmp_path)
    # The MNIST subset is never taken for Fashion-MNIST (same file names): canonical sums apply.
    with pytest.raises(ValueError, match="not the canonical one"):
        load_dataset("fashion_mnist", data_dir=folder, download=False)
    # A generated split in the folder: its sums passed explicitly win over the manifest's.
    _, _, sums = make_idx_split(folder, "t10k", num=12, seed=1)
    images, _ = load_dataset("mnist", data_dir=folder, download=False, checksums=sums)
    assert images.shape == (12, 1, 28, 28)
    with pytest.raises(ValueError, match=SUBSET_MANIFEST):
        load_dataset("mnist", data_dir=folder, download=False)
    # A manifest for the data of a generated split: the folder loads without any checksums argument.
    (folder / SUBSET_MANIFEST).write_text(json.dumps({"dataset": "mnist", "md5": sums}))
    assert load_dataset("mnist", data_dir=folder, download=False)[0].shape == (12, 1, 28, 28)


@pytest.mark.parametrize(
    "content", ["{not json", "[]", json.dumps({"dataset": "mnist"}), json.dumps({"dataset": "mnist", "md5": {"a": 1}})]
)
def test_an_unreadable_subset_manifest_is_a_clear_error(tmp_path, content):
    folder = copy_of_shipped_subset(tmp_path)
    (folder / SUBSET_MANIFEST).write_text(content)
    with pytest.raises(ValueError, match=f"{SUBSET_MANIFEST}: .*(readable|JSON object)"):
        load_dataset("mnist", data_dir=folder, download=False)


# ---------------------------------------------------------------------------
# Generated files
# ---------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_idx_split(folder: Path, prefix: str, num: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Write ``<prefix>-images-idx3-ubyte.gz`` and labels; returns images, labels and their md5s."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
    labels = np.arange(num, dtype=np.uint8) % 10
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        name = f"{prefix}-{kind}-ubyte.gz"
        blob = gzip.compress(idx_bytes(array), mtime=0)
        (folder / name).write_bytes(blob)
        sums[name] = md5(blob)
    return images, labels, sums


class Py2StylePickler(pickle._Pickler):
    """Pickles str/bytes as Python 2 ``str`` (BINSTRING), like the real CIFAR-10 batches (cPickle, protocol 2)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        Py2StylePickler.save_bytes(self, obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def cifar_batch_bytes(images: np.ndarray, labels: np.ndarray, batch_label: str = "training batch") -> bytes:
    buffer = io.BytesIO()
    record = {
        "batch_label": batch_label,
        "labels": [int(x) for x in labels],
        "data": images.reshape(len(images), -1),
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }
    Py2StylePickler(buffer, protocol=2).dump(record)
    # The real files name numpy's pre-2.0 module path; write it the same way.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_cifar_batches(folder: Path, per_batch: int = 4) -> tuple[dict, dict]:
    """Six generated batches (data_batch_1..5, test_batch) in ``folder``; returns arrays and md5s."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, sums = {}, {}
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        blob = cifar_batch_bytes(images, labels)
        (folder / file).write_bytes(blob)
        arrays[file], sums[file] = (images, labels), md5(blob)
    return arrays, sums


# ---------------------------------------------------------------------------
# The real MNIST test split
# ---------------------------------------------------------------------------
def test_real_mnist_test_split_loads_with_verified_checksums(mnist_dir):
    num, label_counts = expected_mnist(mnist_dir)
    for split in ("auto", "test"):
        images, labels = load_dataset("mnist", data_dir=mnist_dir, split=split, download=False)
        assert images.dtype == torch.uint8 and images.shape == (num, 1, 28, 28)
        assert labels.dtype == torch.int64 and labels.shape == (num,)
        assert torch.bincount(labels).tolist() == label_counts
        assert int(images.max()) == 255 and int(images.min()) == 0
        # The first test digit is a 7 whose stroke crosses the image centre row.
        assert int(labels[0]) == 7 and int(images[0, 0, 7:21, 10:20].float().mean()) > 50


def test_real_mnist_missing_train_split_is_one_clear_error(mnist_dir):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("mnist", data_dir=mnist_dir, split="train", download=False)
    message = str(error.value)
    for expected in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        str(mnist_dir),
        "--data-dir",
        "PLASTICITY_DATA",
    ):
        assert expected in message


def test_real_mnist_under_env_var_in_a_subfolder(mnist_dir, tmp_path, monkeypatch):
    (tmp_path / "mnist").symlink_to(Path(mnist_dir).resolve())
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path))
    images, labels = load_dataset("mnist", download=False)
    assert images.shape == (expected_mnist(mnist_dir)[0], 1, 28, 28)
    # Fashion-MNIST has the same file names but lives in its own subfolder: not confused with MNIST.
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST"):
        load_dataset("fashion_mnist", download=False)


# ---------------------------------------------------------------------------
# Folder resolution and splits (generated files)
# ---------------------------------------------------------------------------
def test_generated_idx_round_trip_with_checksum_override(tmp_path):
    images, labels, sums = make_idx_split(tmp_path, "t10k", num=30, seed=1)
    loaded_images, loaded_labels = load_dataset("mnist", data_dir=tmp_path, download=False, checksums=sums)
    assert torch.equal(loaded_images[:, 0], torch.from_numpy(images))
    assert torch.equal(loaded_labels, torch.from_numpy(labels.astype(np.int64)))


def test_auto_split_prefers_train_then_test(tmp_path):
    _, _, test_sums = make_idx_split(tmp_path, "t10k", num=20, seed=1)
    assert load_dataset("mnist", tmp_path, download=False, checksums=test_sums)[0].shape[0] == 20
    _, _, train_sums = make_idx_split(tmp_path, "train", num=40, seed=2)
    sums = {**test_sums, **train_sums}
    assert load_dataset("mnist", tmp_path, download=False, checksums=sums)[0].shape[0] == 40
    assert load_dataset("mnist", tmp_path, split="test", download=False, checksums=sums)[0].shape[0] == 20


def test_data_dir_beats_env_var_and_cache_is_the_fallback(tmp_path, monkeypatch):
    _, _, sums_a = make_idx_split(tmp_path / "a", "t10k", num=11, seed=1)
    _, _, sums_b = make_idx_split(tmp_path / "b" / "fashion_mnist", "t10k", num=12, seed=2)
    _, _, sums_c = make_idx_split(tmp_path / "cache" / "plasticity" / "fashion_mnist", "t10k", num=13, seed=3)
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "b"))
    assert load_dataset("fashion_mnist", tmp_path / "a", download=False, checksums=sums_a)[0].shape[0] == 11
    assert load_dataset("fashion_mnist", download=False, checksums=sums_b)[0].shape[0] == 12
    monkeypatch.delenv(datasets.DATA_ENV_VAR)
    assert load_dataset("fashion_mnist", download=False, checksums=sums_c)[0].shape[0] == 13


def test_unknown_dataset_or_split_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="train, test, auto"):
        load_dataset("mnist", tmp_path, split="validation")
    assert DATASETS == ("mnist", "fashion_mnist", "cifar10")


# ---------------------------------------------------------------------------
# Checksums and corrupt files
# ---------------------------------------------------------------------------
def test_canonical_checksum_rejects_a_foreign_file(tmp_path):
    make_idx_split(tmp_path, "t10k", num=10, seed=1)
    with pytest.raises(ValueError) as error:
        load_dataset("mnist", tmp_path, download=False)  # canonical sums: the generated files do not match
    message = str(error.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "9fb629c4189551a2d022fa330f9573f3" in message
    assert "Delete it and re-download" in message


def test_truncated_file_is_caught_by_its_checksum_and_by_the_parser(tmp_path):
    _, _, sums = make_idx_split(tmp_path, "t10k", num=10, seed=1)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="md5 .* does not match"):
        load_dataset("mnist", tmp_path, download=False, checksums=sums)
    # With a checksum that matches the damaged bytes, the gzip/IDX checks still refuse it.
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*(gzip|IDX)"):
        load_dataset("mnist", tmp_path, download=False, checksums={**sums, path.name: md5(path.read_bytes())})


def test_idx_header_validation():
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(good)), good)
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x03" + idx_bytes(good)[4:], "x.idx")  # float32 type code
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01" + idx_bytes(good)[1:], "x.idx")
    with pytest.raises(ValueError, match=r"declares shape \(2, 3, 4\)"):
        parse_idx(idx_bytes(good)[:-1], "x.idx")
    with pytest.raises(ValueError, match="declares shape"):
        parse_idx(idx_bytes(good) + b"\x00", "x.idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x00\x00", "x.idx")


def test_wrong_image_dims_or_label_count_are_rejected(tmp_path):
    sums = {}
    for name, array in (
        ("t10k-images-idx3-ubyte.gz", np.zeros((5, 32, 32), np.uint8)),  # CIFAR-sized, not MNIST
        ("t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8)),
    ):
        blob = gzip.compress(idx_bytes(array))
        (tmp_path / name).write_bytes(blob)
        sums[name] = md5(blob)
    with pytest.raises(ValueError, match=r"shape \[N, 28, 28\]"):
        load_dataset("mnist", tmp_path, download=False, checksums=sums)
    blob = gzip.compress(idx_bytes(np.zeros(4, np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(blob)
    blob_images = gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(blob_images)
    sums = {"t10k-labels-idx1-ubyte.gz": md5(blob), "t10k-images-idx3-ubyte.gz": md5(blob_images)}
    with pytest.raises(ValueError, match=r"\[4\] labels for 5 images"):
        load_dataset("mnist", tmp_path, download=False, checksums=sums)


def test_md5_is_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    path.write_bytes(b"abc")
    calls = []
    real_md5_of_file = datasets.md5_of_file
    monkeypatch.setattr(datasets, "md5_of_file", lambda p: calls.append(p) or real_md5_of_file(p))
    verify_md5(path, md5(b"abc"))
    verify_md5(path, md5(b"abc"))
    assert len(calls) == 1
    path.write_bytes(b"abd")  # new content (and mtime): verified again, and rejected
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(ValueError, match="file.bin"):
        verify_md5(path, md5(b"abc"))
    assert len(calls) == 2


# ---------------------------------------------------------------------------
# Downloads (with a local stand-in for the network)
# ---------------------------------------------------------------------------
def test_missing_files_with_downloads_disabled_by_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.NO_DOWNLOAD_ENV_VAR, "1")
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", tmp_path)  # download=True, but the env var wins
    message = str(error.value)
    assert CIFAR10_ARCHIVE in message and "data_batch_1" in message and str(tmp_path) in message
    assert datasets.NO_DOWNLOAD_ENV_VAR in message and "--data-dir" in message


def test_download_tries_mirrors_verifies_and_renames_atomically(tmp_path, monkeypatch):
    source_folder = tmp_path / "server"
    _, labels, sums = make_idx_split(source_folder, "train", num=25, seed=3)
    fetched = []

    def fake_fetch(url, destination):
        fetched.append(url)
        if url.startswith(datasets.SOURCES["mnist"].mirrors[0]):
            raise urllib.error.URLError("mirror down")
        destination.write_bytes((source_folder / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(datasets, "_fetch", fake_fetch)
    images, loaded_labels = load_dataset("mnist", tmp_path / "data", checksums=sums)
    assert torch.equal(loaded_labels, torch.from_numpy(labels.astype(np.int64)))
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(sums)  # no .part files
    assert len(fetched) == 4  # two files, first mirror failed for each
    # Loaded again: found on disk, nothing fetched.
    load_dataset("mnist", tmp_path / "data", checksums=sums)
    assert len(fetched) == 4


def test_download_with_wrong_checksum_leaves_nothing_and_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(
        datasets, "_fetch", lambda url, destination: destination.write_bytes(b"<html>moved</html>")
    )
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("fashion_mnist", tmp_path, split="test")
    message = str(error.value)
    assert "md5" in message and "t10k-images-idx3-ubyte.gz" in message and "--data-dir" in message
    assert not any((tmp_path / "fashion_mnist").iterdir())


def test_cifar_download_extracts_only_the_batches(tmp_path, monkeypatch):
    arrays, sums = make_cifar_batches(tmp_path / "build" / CIFAR10_FOLDER)
    archive = tmp_path / "server" / CIFAR10_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    sums[CIFAR10_ARCHIVE] = md5(archive.read_bytes())
    monkeypatch.setattr(
        datasets, "_fetch", lambda url, destination: destination.write_bytes(archive.read_bytes())
    )
    images, labels = load_dataset("cifar10", tmp_path / "data", split="test", checksums=sums)
    assert torch.equal(images, torch.from_numpy(arrays["test_batch"][0]))
    extracted = sorted(p.name for p in (tmp_path / "data" / "cifar10" / CIFAR10_FOLDER).iterdir())
    assert extracted == sorted(f for f in sums if f != CIFAR10_ARCHIVE)


# ---------------------------------------------------------------------------
# CIFAR-10 pickles
# ---------------------------------------------------------------------------
def test_cifar_batches_from_folder_and_from_archive(tmp_path):
    arrays, sums = make_cifar_batches(tmp_path / "folder" / CIFAR10_FOLDER)
    train_images = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    images, labels = load_dataset("cifar10", tmp_path / "folder", download=False, checksums=sums)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(train_images)) and torch.equal(
        labels, torch.from_numpy(train_labels)
    )

    archive_folder = tmp_path / "archive"
    archive_folder.mkdir()
    with tarfile.open(archive_folder / CIFAR10_ARCHIVE, "w:gz") as tar:
        tar.add(tmp_path / "folder" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    sums[CIFAR10_ARCHIVE] = md5((archive_folder / CIFAR10_ARCHIVE).read_bytes())
    test_images, test_labels = load_dataset(
        "cifar10", archive_folder, split="test", download=False, checksums=sums
    )
    assert torch.equal(test_images, torch.from_numpy(arrays["test_batch"][0]))
    # A batch inside the archive that does not match its own md5 is refused.
    with pytest.raises(ValueError, match="test_batch: md5 mismatch"):
        load_dataset(
            "cifar10",
            archive_folder,
            split="test",
            download=False,
            checksums={**sums, "test_batch": "0" * 32},
        )


def test_cifar_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(ValueError, match="refusing to load"):
        parse_cifar_batch(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2), "evil_batch")
    assert not marker.exists()
    with pytest.raises(ValueError, match="uint8"):
        parse_cifar_batch(
            pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=3)
        )
    with pytest.raises(ValueError, match="lacks 'data'"):
        parse_cifar_batch(pickle.dumps({b"labels": [0]}, protocol=3))
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        parse_cifar_batch(b"\x80\x02garbage")


def test_read_idx_gz_rejects_non_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="not a valid gzip file"):
        read_idx_gz(path)


# ---------------------------------------------------------------------------
# Class-balanced subsets
# ---------------------------------------------------------------------------
def test_class_balanced_subset_equal_counts_and_remainder():
    labels = torch.arange(300) % 3
    subset = class_balanced_subset(labels, 10, torch.Generator().manual_seed(0))
    assert subset.shape == (10,) and torch.equal(subset, torch.sort(subset).values)
    assert subset.unique().numel() == 10
    assert sorted(torch.bincount(labels[subset], minlength=3).tolist()) == [3, 3, 4]


def test_class_balanced_subset_water_fills_small_classes():
    labels = torch.cat([torch.zeros(2), torch.ones(100), torch.full((100,), 2.0)]).long()
    subset = class_balanced_subset(labels, 50, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[subset]).tolist() == [2, 24, 24]
    subset = class_balanced_subset(labels, 202, torch.Generator().manual_seed(0))
    assert torch.equal(subset, torch.arange(202))


def test_class_balanced_subset_is_reproducible_and_seed_dependent(mnist_dir):
    _, labels = load_dataset("mnist", mnist_dir, download=False)
    first = class_balanced_subset(labels, 100, torch.Generator().manual_seed(7))
    again = class_balanced_subset(labels, 100, torch.Generator().manual_seed(7))
    other = class_balanced_subset(labels, 100, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.bincount(labels[first]).tolist() == [10] * 10


def test_class_balanced_subset_bad_sizes():
    labels = torch.arange(20) % 4
    for bad in (3, 21):
        with pytest.raises(ValueError, match=r"num_images=.* must lie in \[4, 20\]"):
            class_balanced_subset(labels, bad, torch.Generator())
