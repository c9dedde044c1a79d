"""Write the MNIST test subset shipped with the tests (``tests/data/mnist/``).

Selection rule (deterministic, no randomness): the first ``--per-class`` images
of each class of the MNIST test split (``t10k-*``), in file order, written in
their original relative order. The output is the same IDX format under the
canonical file names, gzipped with ``mtime=0`` (no timestamp, no file name) so
the bytes depend only on the input; ``subset.json`` lists each file's md5, which
``envs.datasets.load_dataset`` uses instead of the canonical sums.

    python tests/data/make_mnist_subset.py                       # from ../shared/datasets/mnist
    python tests/data/make_mnist_subset.py --source DIR --check  # compare with the committed files

Standard library and numpy only (no project imports), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "datasets" / "mnist"  # <repo>/../shared/datasets/mnist
DEFAULT_OUT = HERE / "mnist"
IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
SOURCE_MD5 = {IMAGES: "9fb629c4189551a2d022fa330f9573f3", LABELS: "ec29112dd5afa0611ce80d1b7f02629c"}
MANIFEST = "subset.json"  # envs.datasets.SUBSET_MANIFEST
PER_CLASS = 200


def read_idx_gz(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_gz_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes(), compresslevel=9, mtime=0)


def select(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices (ascending) of the first ``per_class`` images of every class, in file order."""
    keep = [np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)]
    if min(len(k) for k in keep) < per_class:
        raise ValueError(f"a class has fewer than {per_class} images")
    return np.sort(np.concatenate(keep))


def build(source: Path, per_class: int) -> dict[str, bytes]:
    """The subset's files (name -> bytes), manifest included."""
    for name, expected in SOURCE_MD5.items():
        actual = hashlib.md5((source / name).read_bytes()).hexdigest()
        if actual != expected:
            raise SystemExit(f"{source / name}: md5 {actual}, not the canonical {expected}")
    images, labels = read_idx_gz(source / IMAGES), read_idx_gz(source / LABELS)
    index = select(labels, per_class)
    files = {IMAGES: idx_gz_bytes(images[index]), LABELS: idx_gz_bytes(labels[index])}
    manifest = {
        "dataset": "mnist",
        "split": "test",
        "description": f"the first {per_class} images of each class of the MNIST test split "
        f"(t10k), in file order: {len(index)} images",
        "source": "http://yann.lecun.com/exdb/mnist/ (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)",
        "source_md5": SOURCE_MD5,
        "licence": "CC BY-SA 3.0 (Yann LeCun, Corinna Cortes, Christopher J.C. Burges); see README.md",
        "made_by": "tests/data/make_mnist_subset.py",
        "num_images": int(len(index)),
        "label_counts": np.bincount(labels[index], minlength=10).tolist(),
        "md5": {name: hashlib.md5(blob).hexdigest() for name, blob in files.items()},
    }
    files[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the full t10k files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    parser.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = parser.parse_args(argv)
    files = build(args.source, args.per_class)
    if args.check:
        differ = [n for n, blob in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != blob]
        print("identical" if not differ else f"differ: {', '.join(differ)}")
        return 1 if differ else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (args.out / name).write_bytes(blob)
        print(f"{args.out / name}: {len(blob):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
