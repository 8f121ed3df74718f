"""Batched tensor transforms and the seeding rule that makes augmentation exactly resumable.

Augmentation randomness never comes from a global RNG: each batch gets its own
``torch.Generator`` seeded with ``mix_seed(seed, epoch, batch_index, rank)``, so the augmented
batch is a pure function of (seed, epoch, batch index, rank) and of the sample indices, whatever
happened before (resume mid-epoch, another number of loader workers).
"""
from typing import Optional, Sequence

import torch

__all__ = ["mix_seed", "batch_generator", "normalize", "random_crop_flip", "BatchTransform",
           "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN",
           "IMAGENET_STD"]

# Per-channel statistics of the training sets, on pixels scaled to [0, 1] (the values the SAQ
# reference code uses).
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50705882, 0.48666667, 0.44078431)
CIFAR100_STD = (0.26745098, 0.25568627, 0.27607843)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 chained over the values).

    Unlike ``seed + epoch`` it does not collide across arguments: mix_seed(0, 1) != mix_seed(1, 0).
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def batch_generator(seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
    """CPU generator for the augmentation of one batch: seeded by mix_seed(seed, epoch, batch,
    rank)."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, batch, rank))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [B, C, H, W] (0..255) or floats in [0, 1] -> float32 (x / 255 - mean) / std,
    per channel. Returns a new tensor."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample random crop of size (H, W) from the zero-padded batch, then a random horizontal
    flip with probability 1/2: torchvision's RandomCrop(H, padding) + RandomHorizontalFlip, batched.

    x: [B, C, H, W], any dtype (pad with 0 before normalizing, as torchvision does on images).
    Draws, in this order from ``generator``: row offsets [B] and column offsets [B] uniform in
    [0, 2 * padding], then flip bits [B]. Returns a new [B, C, H, W] tensor of x's dtype.
    """
    b, c, h, w = x.shape
    g = generator
    if padding > 0:
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    rows = top[:, None] + torch.arange(h)  # [B, H]
    cols = torch.arange(w).expand(b, w)
    if flip:
        flipped = torch.randint(0, 2, (b,), generator=g).bool()
        # A flip is a reversed column index, so crop and flip are two gathers in total.
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = left[:, None] + cols  # [B, W]
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class BatchTransform:
    """Batch transform of the tensor datasets: optional crop + flip (``train`` and a generator
    given), then normalization.

    __call__(x [B, C, H, W] uint8 or float, generator or None) -> float32 [B, C, H, W].
    With generator None the random part is skipped (deterministic evaluation view).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], train: bool = False,
                 padding: int = 4, flip: bool = True):
        self.mean, self.std = tuple(mean), tuple(std)
        self.train, self.padding, self.flip = train, padding, flip

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        if self.train and generator is not None:
            x = random_crop_flip(x, self.padding, self.flip, generator)
        return normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        aug = f"crop(pad={self.padding}) + flip={self.flip}, " if self.train else ""
        return f"BatchTransform({aug}mean={self.mean}, std={self.std})"
