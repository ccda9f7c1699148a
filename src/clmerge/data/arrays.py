"""Datasets that ship as arrays in torchvision's formats: CIFAR-100 pickles, MNIST idx files, SVHN .mat.

CIFAR-100's official files are Python pickles; they are read with an unpickler that admits only the few
numpy reconstructors an array needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from clmerge.data.catalog import DatasetSpec
from clmerge.data.filelist import missing_layout

Arrays = tuple[np.ndarray, np.ndarray, tuple[str, ...]]  # images [N, H, W(, 3)] uint8, labels [N], raw classes

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FILES = ("train", "test", "meta")
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle (train, test or meta) as a dict with str keys."""
    with open(path, "rb") as handle:
        return _ArrayUnpickler(handle, encoding="latin1").load()


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's .mat: images [N, 32, 32, 3] and labels with 10 mapped to 0 (as torchvision does)."""
    from scipy.io import loadmat

    mat = loadmat(path)
    labels = mat["y"].astype(np.int64).flatten()
    labels[labels == 10] = 0
    return np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)), labels


def load_arrays(spec: DatasetSpec, data_root: Path, split: str) -> Arrays:
    """The images, labels and raw class names of `split` ("train" or "test") of an array dataset."""
    directory = Path(data_root) / spec.directory
    needed = {"cifar": list(CIFAR_FILES), "mnist": list(MNIST_FILES[split]), "svhn": [SVHN_FILES[split]]}
    for name in needed[spec.storage]:
        if not (directory / name).is_file():
            raise missing_layout(spec, data_root, f"{directory / name} is missing")
    try:
        if spec.storage == "cifar":
            batch = read_cifar_pickle(directory / split)
            names = tuple(read_cifar_pickle(directory / "meta")["fine_label_names"])
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return np.ascontiguousarray(images), np.asarray(batch["fine_labels"], dtype=np.int64), names
        if spec.storage == "mnist":
            images_file, labels_file = MNIST_FILES[split]
            labels = read_idx(directory / labels_file).astype(np.int64)
            return read_idx(directory / images_file), labels, tuple(spec.classes or ())
        images, labels = read_svhn(directory / SVHN_FILES[split])
        return images, labels, tuple(spec.classes or ())
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as err:
        raise missing_layout(spec, data_root, f"cannot read {spec.title} under {directory} "
                                              f"({type(err).__name__}: {err})") from None
