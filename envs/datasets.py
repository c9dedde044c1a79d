"""Image datasets for the image-classification MDP (spec environments.md §1, "Datasets").

``load_dataset(name)`` returns ``(images, labels)``: images uint8 ``[N, C, H, W]``
(MNIST / Fashion-MNIST: 1x28x28, CIFAR-10: 3x32x32), labels int64 ``[N]``.

Where the files are looked for (first match wins):

1. the ``data_dir`` argument (the agents' ``--data-dir``), else
2. the folder in the environment variable ``PLASTICITY_DATA``;
   in both cases the files may lie directly in the folder or in a ``<name>/``
   subfolder (``mnist/``, ``fashion_mnist/``, ``cifar10/``), else
3. the cache folder ``$XDG_CACHE_HOME/plasticity/<name>`` (``~/.cache`` by default).

Files, with their canonical names and md5 sums (those published with the data
and used by torchvision):

- MNIST / Fashion-MNIST: the four IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
- CIFAR-10: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/``
  (``data_batch_1`` .. ``data_batch_5``, ``test_batch``; the batch files may also
  lie directly in the folder). Batches are Python pickles: they are read with a
  restricted unpickler that can only build dicts, lists, strings, ints and numpy
  arrays, never arbitrary objects.

Missing files are downloaded once from the canonical mirrors into
``<folder>/<name>/`` (or the cache folder), md5-verified and renamed into place
atomically -- unless ``download=False`` or ``PLASTICITY_NO_DOWNLOAD`` is set, in
which case (or when every mirror fails) one ``FileNotFoundError`` names the
files expected, the folders searched and how to provide them.

Every file is md5-verified before it is parsed (the result is cached per path,
size and mtime, so repeated loads only re-parse). A file with the wrong checksum
or a malformed header is a ``ValueError`` that names the file and says to delete
or re-download it. ``checksums`` overrides the canonical sums per file name, for
custom or generated files in the same formats.

Subsets: a folder whose files are a documented subset of a dataset (e.g. the
2,000-image MNIST test subset shipped in ``tests/data/mnist``) carries a manifest
``subset.json`` (``SUBSET_MANIFEST``) next to the files::

    {"dataset": "mnist", "split": "test", "md5": {"t10k-images-idx3-ubyte.gz": "<md5>", ...},
     "source": "...", "licence": "...", ...}

When the folder the files were found in holds a manifest for the dataset being
loaded, the md5 sums it lists replace the canonical ones for those files (an
explicit ``checksums`` argument still wins), so ``--data-dir tests/data/mnist``
just works. A file that does not match its manifest is the same ``ValueError``,
naming the file and the manifest; an unreadable manifest is a ``ValueError``
naming it. A manifest for another dataset is ignored (the canonical sums apply,
so MNIST files are never taken for Fashion-MNIST).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "test", "auto")
DATA_ENV_VAR = "PLASTICITY_DATA"
NO_DOWNLOAD_ENV_VAR = "PLASTICITY_NO_DOWNLOAD"

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
SUBSET_MANIFEST = "subset.json"  # md5 sums of a subset's files, next to them (module docstring)


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and what its files must hash to."""

    title: str
    split_files: Mapping[str, tuple[str, ...]]  # split -> file names (IDX files or CIFAR batches)
    md5: Mapping[str, str]  # file name -> canonical md5
    mirrors: tuple[str, ...]  # base URLs, tried in order
    image_shape: tuple[int, int, int]
    num_classes: int
    archive: str | None = None  # CIFAR-10: every batch comes in one tarball


SOURCES: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        title="MNIST",
        split_files={
            "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        },
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        image_shape=(1, 28, 28),
        num_classes=10,
    ),
    "fashion_mnist": DatasetSource(
        title="Fashion-MNIST",
        split_files={
            "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        },
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        image_shape=(1, 28, 28),
        num_classes=10,
    ),
    "cifar10": DatasetSource(
        title="CIFAR-10",
        split_files={
            "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test": ("test_batch",),
        },
        md5={
            CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a",
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        image_shape=(3, 32, 32),
        num_classes=10,
        archive=CIFAR10_ARCHIVE,
    ),
}

IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one these datasets use
DOWNLOAD_TIMEOUT_S = 60


# ---------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------
_verified_files: set[tuple[str, int, int, str]] = set()


def md5_of_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike, expected_md5: str, listed_in: str | os.PathLike | None = None) -> None:
    """Raise ValueError unless the file hashes to ``expected_md5``; cached per path, size and mtime.

    ``listed_in``: the subset manifest the sum comes from (named in the error), else the canonical sum.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected_md5)
    if key in _verified_files:
        return
    actual = md5_of_file(path)
    if actual != expected_md5 and listed_in is not None:
        raise ValueError(
            f"{path}: md5 {actual} does not match the {expected_md5} listed in {listed_in}; the file is "
            "corrupt, truncated or was changed. Restore it (or regenerate the subset with the script the "
            "manifest names)."
        )
    if actual != expected_md5:
        raise ValueError(
            f"{path}: md5 {actual} does not match the expected {expected_md5}; the file is corrupt, "
            "truncated or not the canonical one. Delete it and re-download it (or provide the original file)."
        )
    _verified_files.add(key)


# ---------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------
def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an (uncompressed) IDX file of unsigned bytes into an array of its declared shape."""
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file (only {len(data)} bytes). Delete it and re-download it.")
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or type_code != IDX_UBYTE or not 1 <= ndim <= 4:
        raise ValueError(
            f"{source}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            f"(expected 0x0000080N: unsigned bytes, N dims). Delete it and re-download it."
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{source}: IDX header truncated. Delete it and re-download it.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_len:
        raise ValueError(
            f"{source}: IDX header declares shape {dims} ({expected_len} bytes) but the file holds "
            f"{len(data)} bytes. Delete it and re-download it."
        )
    # bytearray: a writable copy, so torch.from_numpy gets memory it may own.
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx_gz(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped IDX file (no checksum: see ``verify_md5``)."""
    try:
        data = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a valid gzip file ({error}). Delete it and re-download it.") from error
    return parse_idx(data, source=str(path))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild what CIFAR batches hold: builtins and numpy arrays.

    Anything else (``os.system``, arbitrary classes, ...) is refused, so a
    tampered batch file cannot run code.
    """

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return allowed


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (module, t.__name__): t
        for module in ("builtins", "__builtin__")
        for t in (dict, list, bytes, str, int)
    },
}


def parse_cifar_batch(data: bytes, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch (pickled dict) into images [n, 3, 32, 32] and labels [n]."""
    try:
        batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(
            f"{source}: not a readable CIFAR-10 batch ({type(error).__name__}: {error}). "
            "Delete it and re-download it."
        ) from error
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: a CIFAR-10 batch is a pickled dict, got {type(batch).__name__}.")
    # Python-2 pickles read with encoding="bytes" have bytes keys; tolerate str keys too.
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{source}: CIFAR-10 batch lacks 'data'/'labels' (keys: {sorted(batch)}).")
    images = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{source}: CIFAR-10 'data' must be uint8 [n, 3072], got {images.dtype} {images.shape}."
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{source}: {labels.shape[0]} labels for {images.shape[0]} images.")
    return images.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------------------
# Folders and file discovery
# ---------------------------------------------------------------------------
def cache_folder(name: str) -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "plasticity" / name


def dataset_folders(name: str, data_dir: str | os.PathLike | None = None) -> tuple[list[Path], Path]:
    """The folders searched for ``name`` (in order) and the folder downloads go to.

    With a user folder (``data_dir`` or ``$PLASTICITY_DATA``) downloads go to its
    ``<name>/`` subfolder, since MNIST and Fashion-MNIST share file names.
    """
    root = data_dir if data_dir is not None else os.environ.get(DATA_ENV_VAR) or None
    if root is None:
        folder = cache_folder(name)
        return [folder], folder
    root = Path(root).expanduser()
    return [root, root / name], root / name


@dataclass(frozen=True)
class _Located:
    """Where one split's files were found: plain files in ``folder``, or members of ``archive``."""

    folder: Path | None = None
    archive: Path | None = None


def _locate(source: DatasetSource, split: str, folders: list[Path]) -> _Located | None:
    wanted = source.split_files[split]
    for folder in folders:
        candidates = [folder / CIFAR10_FOLDER, folder] if source.archive else [folder]
        for candidate in candidates:
            if all((candidate / file).is_file() for file in wanted):
                return _Located(folder=candidate)
        if source.archive and (folder / source.archive).is_file():
            return _Located(archive=folder / source.archive)
    return None


def _expected_files_text(source: DatasetSource, split: str) -> str:
    files = ", ".join(source.split_files[split])
    if source.archive:
        return f"{source.archive} or {CIFAR10_FOLDER}/ with {files}"
    return files


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------
def _fetch(url: str, destination: Path) -> None:
    """Stream ``url`` into ``destination`` (a temporary path)."""
    request = urllib.request.Request(url, headers={"User-Agent": "plasticity-rl dataset loader"})
    with (
        urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
        open(destination, "wb") as out,
    ):
        while block := response.read(1 << 20):
            out.write(block)


def _download_file(file: str, mirrors: tuple[str, ...], md5: str, folder: Path) -> list[str]:
    """Download ``file`` from the first mirror that serves the right bytes; returns the failures."""
    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for mirror in mirrors:
        url = mirror + file
        partial = folder / f".{file}.part-{os.getpid()}"
        try:
            print(f"downloading {url} -> {folder / file}", flush=True)
            _fetch(url, partial)
            actual = md5_of_file(partial)
            if actual != md5:
                raise ValueError(f"md5 {actual} != expected {md5}")
            os.replace(partial, folder / file)  # atomic: readers never see a half-written file
            return []
        except Exception as error:  # network errors, HTTP errors, bad checksum: try the next mirror
            failures.append(f"{url}: {type(error).__name__}: {error}")
        finally:
            partial.unlink(missing_ok=True)
    return failures


def _extract_cifar_batches(archive: Path, source: DatasetSource, folder: Path) -> None:
    """Extract only the known batch files of a verified archive into ``folder/cifar-10-batches-py``."""
    target = folder / CIFAR10_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    members = _read_archive_members(
        archive, source, [f for files in source.split_files.values() for f in files]
    )
    for file, data in members.items():
        partial = target / f".{file}.part-{os.getpid()}"
        partial.write_bytes(data)
        os.replace(partial, target / file)


def _read_archive_members(archive: Path, source: DatasetSource, files: list[str] | tuple[str, ...]) -> dict:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {}
            for file in files:
                handle = tar.extractfile(f"{CIFAR10_FOLDER}/{file}")
                if handle is None:
                    raise KeyError(file)
                members[file] = handle.read()
    except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{archive}: not a readable CIFAR-10 archive ({type(error).__name__}: {error}). "
            "Delete it and re-download it."
        ) from error
    return members


# ---------------------------------------------------------------------------
# Subset manifests
# ---------------------------------------------------------------------------
def read_subset_manifest(folder: Path, name: str) -> tuple[dict[str, str], Path | None]:
    """md5 per file from ``folder/subset.json`` when it describes dataset ``name``; ``({}, None)`` otherwise."""
    path = folder / SUBSET_MANIFEST
    if not path.is_file():
        return {}, None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable subset manifest ({error}). Restore it or delete it.") from error
    sums = manifest.get("md5") if isinstance(manifest, dict) else None
    if not isinstance(sums, dict) or not all(
        isinstance(f, str) and isinstance(m, str) and len(m) == 32 for f, m in sums.items()
    ):
        raise ValueError(
            f"{path}: a subset manifest is a JSON object with \"dataset\" and \"md5\": "
            "{file name: 32-hex md5}. Restore it or delete it."
        )
    if manifest.get("dataset") != name:
        return {}, None
    return {f: m.lower() for f, m in sums.items()}, path


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def _load_idx_split(
    folder: Path, source: DatasetSource, split: str, md5: Mapping[str, str], listed: Mapping[str, Path]
):
    image_file, label_file = source.split_files[split]
    for file in (image_file, label_file):
        verify_md5(folder / file, md5[file], listed.get(file))
    images = read_idx_gz(folder / image_file)
    labels = read_idx_gz(folder / label_file)
    height, width = source.image_shape[1:]
    if images.ndim != 3 or images.shape[1:] != (height, width):
        raise ValueError(
            f"{folder / image_file}: expected {source.title} images of shape [N, {height}, {width}], "
            f"got {list(images.shape)}. Delete it and re-download it."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{folder / label_file}: {list(labels.shape)} labels for {images.shape[0]} images in {image_file}. "
            "Delete both files and re-download them."
        )
    return images[:, None], labels


def _load_cifar_split(
    located: _Located, source: DatasetSource, split: str, md5: Mapping[str, str], listed: Mapping[str, Path]
):
    files = source.split_files[split]
    if located.archive is not None:
        verify_md5(located.archive, md5[source.archive], listed.get(source.archive))
        blobs = _read_archive_members(located.archive, source, files)
        origin = {file: f"{located.archive}:{CIFAR10_FOLDER}/{file}" for file in files}
        for file, data in blobs.items():
            if md5_of_bytes(data) != md5[file]:
                listed_text = f" (listed in {listed[file]})" if file in listed else ""
                raise ValueError(
                    f"{origin[file]}: md5 mismatch{listed_text}. Delete {located.archive} and re-download it."
                )
    else:
        for file in files:
            verify_md5(located.folder / file, md5[file], listed.get(file))
        blobs = {file: (located.folder / file).read_bytes() for file in files}
        origin = {file: str(located.folder / file) for file in files}
    parts = [parse_cifar_batch(blobs[file], source=origin[file]) for file in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "auto",
    download: bool = True,
    checksums: Mapping[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset as ``(images uint8 [N, C, H, W], labels int64 [N])`` on the CPU.

    Args:
        name: one of ``DATASETS``.
        data_dir: folder holding the files (directly or in ``<name>/``); default
            ``$PLASTICITY_DATA``, else the cache folder (module docstring).
        split: ``"train"``, ``"test"``, or ``"auto"``: train when its files are
            present, else test when its files are present, else download train.
        download: allow downloading missing files (also disabled by ``$PLASTICITY_NO_DOWNLOAD``).
        checksums: md5 per file name, replacing the canonical sums (for custom or
            generated files in the same formats); files not named keep theirs. They
            also win over a subset manifest (``SUBSET_MANIFEST``) in the data folder.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    source = SOURCES[name]
    md5 = {**source.md5, **(checksums or {})}
    folders, download_folder = dataset_folders(name, data_dir)

    if split == "auto":
        split = next((s for s in ("train", "test") if _locate(source, s, folders)), "train")
    located = _locate(source, split, folders)
    if located is None:
        located = _download_split(name, source, split, folders, download_folder, md5, download)

    # A subset manifest next to the files replaces the canonical sums of the files it lists.
    subset_sums, manifest = read_subset_manifest(located.folder or located.archive.parent, name)
    listed = {file: manifest for file in subset_sums if file not in (checksums or {})}
    md5 = {**source.md5, **subset_sums, **(checksums or {})}
    if source.archive:
        images, labels = _load_cifar_split(located, source, split, md5, listed)
    else:
        images, labels = _load_idx_split(located.folder, source, split, md5, listed)
    if labels.size and int(labels.max()) >= source.num_classes:
        raise ValueError(
            f"{name} ({split}): label {int(labels.max())} outside 0..{source.num_classes - 1}; "
            "the files are not the canonical ones. Delete them and re-download them."
        )
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _download_split(name, source, split, folders, download_folder, md5, download) -> _Located:
    searched = ", ".join(str(f) for f in folders)
    expected = _expected_files_text(source, split)
    how_to = (
        f"Put the files in a folder and pass it with --data-dir <folder> or {DATA_ENV_VAR}=<folder> "
        f"(directly in it or in a '{name}/' subfolder)"
    )
    disabled_by_env = bool(os.environ.get(NO_DOWNLOAD_ENV_VAR))
    if not download or disabled_by_env:
        reason = f"{NO_DOWNLOAD_ENV_VAR} is set" if disabled_by_env else "download=False"
        raise FileNotFoundError(
            f"{source.title} ({split} split) not found: expected {expected} in {searched}. "
            f"Downloading is disabled ({reason}). {how_to}."
        )
    files = (source.archive,) if source.archive else source.split_files[split]
    failures = []
    for file in files:
        if not (download_folder / file).is_file():
            failures += _download_file(file, source.mirrors, md5[file], download_folder)
    if failures:
        raise FileNotFoundError(
            f"{source.title} ({split} split) not found: expected {expected} in {searched}, "
            f"and downloading into {download_folder} failed:\n  " + "\n  ".join(failures) + f"\n{how_to}."
        )
    if source.archive:
        verify_md5(download_folder / source.archive, md5[source.archive])
        _extract_cifar_batches(download_folder / source.archive, source, download_folder)
    located = _locate(source, split, [download_folder])
    assert located is not None, "downloaded files must be found where they were written"
    return located


# ---------------------------------------------------------------------------
# Class-balanced subsets
# ---------------------------------------------------------------------------
def class_balanced_subset(labels: torch.Tensor, num_images: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (sorted, int64, on ``labels.device``) of ``num_images`` images, as class balanced as possible.

    Every class present gets ``num_images // K`` images, the remainder going one
    each to random classes; a class with too few images gives all it has and
    its shortfall is shared among the others (water filling). Which images of a
    class are kept is uniformly random. Reproducible from ``generator``.
    """
    labels = labels.reshape(-1).long()
    num_total = labels.numel()
    classes, counts = torch.unique(labels.cpu(), return_counts=True)
    num_classes = classes.numel()
    if not num_classes <= num_images <= num_total:
        raise ValueError(
            f"num_images={num_images} must lie in [{num_classes}, {num_total}]: at least one image per class "
            f"({num_classes} classes) and at most the {num_total} images of the dataset."
        )
    # Water filling over the classes, smallest first (K is tiny: a Python loop is fine here).
    quotas = torch.zeros(num_classes, dtype=torch.long)
    remaining = num_images
    order = torch.argsort(counts, stable=True).tolist()
    for position, k in enumerate(order):
        fair_share = remaining // (num_classes - position)
        if counts[k] > fair_share:
            rest = torch.tensor(order[position:])
            base, extra = divmod(remaining, rest.numel())
            quotas[rest] = base
            lucky = torch.randperm(rest.numel(), generator=generator, device=generator.device)[:extra].cpu()
            quotas[rest[lucky]] += 1
            break
        quotas[k] = counts[k]
        remaining -= int(counts[k])

    # Shuffle, then stable-sort by class: each class's images end up in random order.
    shuffle = torch.randperm(num_total, generator=generator, device=generator.device).cpu()
    class_index = torch.searchsorted(classes, labels.cpu())
    by_class = shuffle[torch.argsort(class_index[shuffle], stable=True)]
    class_start = torch.cumsum(counts, 0) - counts
    sorted_class = class_index[by_class]
    rank_in_class = torch.arange(num_total) - class_start[sorted_class]
    keep = rank_in_class < quotas[sorted_class]
    return torch.sort(by_class[keep]).values.to(labels.device)
