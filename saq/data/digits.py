"""The scikit-learn 8x8 digits (1797 images, 10 classes, shipped inside scikit-learn: no
download). The project's default dataset: small enough to train on a CPU in seconds."""
from typing import Tuple

import numpy as np
import torch

from .base import TensorImageDataset

__all__ = ["digits_split_indices", "digits_split", "digits_dataset"]


def _sklearn():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - sklearn is a dependency of the package
        raise ImportError("saq.data: the 'digits' dataset needs scikit-learn: "
                          "pip install scikit-learn") from e
    return load_digits, train_test_split


def digits_split_indices(seed: int = 0, test_fraction: float = 0.2
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (into sklearn's load_digits order) of the train and test parts: disjoint, together
    all 1797 images, class proportions preserved (stratified). A pure function of
    (seed, test_fraction): sklearn's train_test_split(stratify=labels, random_state=seed)."""
    load_digits, train_test_split = _sklearn()
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"saq.data digits: test_fraction must be in (0, 1), got {test_fraction}")
    y = load_digits().target
    return train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                            random_state=seed)


def digits_split(seed: int = 0, test_fraction: float = 0.2
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified train/test split of the digits, normalized.

    Pixels (integers 0..16) are scaled to [0, 1], then standardized with the mean and std of all
    training pixels (one channel, so two scalars): x = (p / 16 - mean) / std.
    The split is digits_split_indices(seed, test_fraction); 0.2 gives 1437 train / 360 test.
    Returns x_train [N, 1, 8, 8] float32, y_train [N] int64, x_test [M, 1, 8, 8], y_test [M].
    """
    load_digits, _ = _sklearn()
    tr, te = digits_split_indices(seed, test_fraction)
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = x[tr], x[te], y[tr], y[te]
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
            torch.from_numpy(y_te))


def digits_dataset(train: bool = True, seed: int = 0,
                   test_fraction: float = 0.2) -> TensorImageDataset:
    """The train (or test) part of ``digits_split(seed, test_fraction)`` as a dataset of
    normalized [1, 8, 8] float32 images, 10 classes, no augmentation."""
    x_tr, y_tr, x_te, y_te = digits_split(seed, test_fraction)
    x, y = (x_tr, y_tr) if train else (x_te, y_te)
    return TensorImageDataset(x, y, num_classes=10, transform=None,
                              classes=[str(i) for i in range(10)])
