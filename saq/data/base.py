"""Batch keys, the epoch-seeded batch sampler and the in-memory image dataset.

How the loaders stay reproducible and resumable: the sampler, not the dataset, decides each batch.
For epoch k the sample order is ``torch.randperm(N, generator=Generator().manual_seed(seed + k))``
(torch's DistributedSampler rule; with several ranks that order is padded to a multiple of the
world size and rank r takes every world-th index from r). The order is cut into batches and batch
b is handed to the dataset as a ``BatchKey(indices, seed, epoch, b, rank)``; the dataset gathers
those samples and draws their augmentation from ``batch_generator(seed, epoch, b, rank)``. So
batch b of epoch k is a pure function of (seed, epoch, b, rank, world size, batch size): a run
resumed with ``sampler.set_epoch(k, start_batch=b)`` sees exactly the batches it would have seen.
"""
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from .transforms import batch_generator

__all__ = ["BatchKey", "DataError", "EpochBatchSampler", "ShardSampler", "TensorImageDataset"]


class DataError(ValueError):
    """A data set file that exists but cannot be used (damaged, foreign, wrong shape); the
    message names the file and the fix. The command line prints it as one line."""


@dataclass(frozen=True)
class BatchKey:
    """One batch: sample indices plus what seeds its augmentation. Picklable (loader workers)."""

    indices: Tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    batch: int = 0
    rank: int = 0

    def generator(self) -> torch.Generator:
        """The batch's augmentation generator: batch_generator(seed, epoch, batch, rank)."""
        return batch_generator(self.seed, self.epoch, self.batch, self.rank)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2 world, ... of range(n), in order, without padding:
    every sample is evaluated exactly once over all ranks (DistributedSampler would repeat a few
    to even out the shards, which skews summed metrics)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class EpochBatchSampler(Sampler[BatchKey]):
    """Cuts the index order of ``index_sampler`` into batches and yields one BatchKey per batch.

    Use it with ``DataLoader(dataset, batch_size=None, sampler=this)``: automatic batching is off
    and the loader calls ``dataset[key]`` once per batch (in a worker when num_workers > 0).

    set_epoch(epoch, start_batch=0): call at the start of every epoch (forwarded to the index
    sampler); start_batch > 0 skips the first batches of that epoch without loading them, for a
    mid-epoch resume. ``len()`` counts the batches still to come in the epoch; ``num_batches`` is
    the full count.
    """

    def __init__(self, index_sampler: Sampler, batch_size: int, drop_last: bool = False,
                 seed: int = 0, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"EpochBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.index_sampler = index_sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.seed, self.rank = seed, rank
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        n = len(self.index_sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch`` (its shuffle order and augmentation) and start at batch
        ``start_batch``. Mutates this sampler and the wrapped index sampler."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"set_epoch: start_batch must be in [0, {self.num_batches}], "
                             f"got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        if hasattr(self.index_sampler, "set_epoch"):
            self.index_sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[BatchKey]:
        order = list(self.index_sampler)
        bs = self.batch_size
        for b in range(self.start_batch, self.num_batches):
            yield BatchKey(tuple(order[b * bs:(b + 1) * bs]), self.seed, self.epoch, b,
                           self.rank)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, transformed per batch.

    images: [N, C, H, W] (uint8 raw pixels, or float already normalized); labels: [N] int64.
    transform(x, generator) -> float32 [B, C, H, W] (e.g. BatchTransform), or None to return the
    stored images unchanged.

    ``ds[i]`` -> (x [C, H, W] float32, y 0-dim int64), without random augmentation.
    ``ds[key]`` with a BatchKey -> (x [B, C, H, W] float32, y [B] int64), augmented with the key's
    generator when the transform is a training one.
    Attributes: num_classes, input_shape (C, H, W), classes (names, may be None).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None):
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"TensorImageDataset: need images [N, C, H, W] and labels [N], got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.num_classes, self.transform = num_classes, transform
        self.classes = list(classes) if classes is not None else None
        self.input_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def _apply(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return x.float() if self.transform is None else self.transform(x, generator)

    def __getitem__(self, key):
        if isinstance(key, BatchKey):
            idx = torch.as_tensor(key.indices, dtype=torch.long)
            return self._apply(self.images[idx], key.generator()), self.labels[idx]
        # a copy: ds[i] of a float data set without a transform must not alias the stored images
        return self._apply(self.images[key][None], None)[0].clone(), self.labels[key]
