"""CIFAR-10 / CIFAR-100 from the standard "python version" pickle folders, no torchvision.

Expected layout under ``root`` (what extracting the official archives gives):
    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}
``root`` may also be the folder itself. Images stay in memory as uint8 [N, 3, 32, 32]
(150 MB for a training set); normalization and augmentation run per batch (transforms.py).
"""
import os
import pickle
from typing import Dict, List, Tuple

import numpy as np
import torch

from .base import DataError, TensorImageDataset
from .transforms import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                         BatchTransform)

__all__ = ["CIFAR_SPECS", "cifar_folder", "load_cifar", "cifar_dataset"]

# Layout and statistics of each dataset: extracted folder, archive URL, pickle files, label key.
CIFAR_SPECS: Dict[str, dict] = {
    "cifar10": dict(folder="cifar-10-batches-py",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key="labels", meta="batches.meta", names_key="label_names",
                    num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(folder="cifar-100-python",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     train=["train"], test=["test"], label_key="fine_labels", meta="meta",
                     names_key="fine_label_names", num_classes=100, mean=CIFAR100_MEAN,
                     std=CIFAR100_STD),
}

# The only globals a CIFAR pickle needs (numpy array reconstruction, and _codecs.encode, which
# protocol-2 pickles written by Python 3 use for bytes). Anything else is refused, so a tampered
# file in the data folder cannot run code when loaded.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"saq.data cifar: refusing to load global {module}.{name} from a CIFAR pickle "
                f"(only numpy arrays are expected); is the file a genuine CIFAR batch?")
        return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
    """One CIFAR batch file as a dict; a damaged or foreign file raises ValueError naming it."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise pickle.UnpicklingError(f"a {type(d).__name__}, not a dict")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"saq.data cifar: cannot read {path}: {first}; download and extract the "
                         "archive again") from e
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar_folder(name: str, root: str) -> str:
    """Path of the extracted folder of ``name`` ("cifar10" / "cifar100") under ``root``.

    Raises FileNotFoundError saying where to download the archive and where to extract it.
    """
    spec = CIFAR_SPECS[name]
    if root is None:
        raise FileNotFoundError(
            f"saq.data {name}: root is None; pass root=DIR where DIR contains the folder "
            f"'{spec['folder']}' (download {spec['url']} and run "
            f"`tar -xzf {os.path.basename(spec['url'])} -C DIR`)")
    root = os.path.expanduser(str(root))
    candidates = [os.path.join(root, spec["folder"]), root]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, f)) for f in spec["train"] + spec["test"]):
            return folder
    raise FileNotFoundError(
        f"saq.data {name}: no '{spec['folder']}' folder with files "
        f"{', '.join(spec['train'] + spec['test'])} under root={root!r}. Download "
        f"{spec['url']} (the 'CIFAR python version') and extract it into that root: "
        f"`mkdir -p {root} && tar -xzf {os.path.basename(spec['url'])} -C {root}`, "
        f"which creates {os.path.join(root, spec['folder'])}. No automatic download.")


def load_cifar(name: str, root: str, train: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Read the train (50000) or test (10000) split of ``name``.

    Returns images [N, 3, 32, 32] uint8 (RGB, row-major as stored), labels [N] int64 (fine labels
    for CIFAR-100), and the class names (empty if the meta file is absent).
    """
    spec = CIFAR_SPECS[name]
    folder = cifar_folder(name, root)
    xs, ys = [], []
    for f in spec["train"] if train else spec["test"]:
        d = _load_pickle(os.path.join(folder, f))
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[spec["label_key"]], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"saq.data {name}: {f} holds data {data.shape} and "
                             f"{len(labels)} labels; expected [N, 3072] and N labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    classes: List[str] = []
    meta = os.path.join(folder, spec["meta"])
    if os.path.isfile(meta):
        names = _load_pickle(meta).get(spec["names_key"], [])
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes


def cifar_dataset(name: str, root: str, train: bool = True, augment: bool = True,
                  padding: int = 4) -> TensorImageDataset:
    """CIFAR as a TensorImageDataset: uint8 storage; per batch, when ``train and augment``,
    random crop 32 from the image zero-padded by ``padding`` plus horizontal flip, then
    normalization with the dataset's mean/std. Items are float32 [3, 32, 32]."""
    spec = CIFAR_SPECS[name]
    x, y, classes = load_cifar(name, root, train)
    tf = BatchTransform(spec["mean"], spec["std"], train=train and augment, padding=padding)
    return TensorImageDataset(x, y, spec["num_classes"], tf, classes or None)
