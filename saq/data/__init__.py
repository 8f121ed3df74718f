"""Datasets and reproducible, resumable loaders for the training package (no torchvision needed
except for ImageFolder).

    train_loader, test_loader, info = make_loaders("digits", batch_size=64, seed=0)
    for epoch in range(start_epoch, epochs):
        set_epoch(train_loader, epoch)            # or train_loader.sampler.set_epoch(epoch)
        for x, y in train_loader: ...             # x [B, *info["input_shape"]] float32, y [B] int64

Determinism contract (details in saq/data/base.py): the shuffle order of epoch k is
``torch.randperm(N, generator=torch.Generator().manual_seed(seed + k))`` (DistributedSampler's
rule; sharded by rank when distributed), and batch b's augmentation is drawn from a generator
seeded with ``mix_seed(seed, k, b, rank)``. Nothing reads the global RNG. A run resumed at epoch k,
batch b calls ``set_epoch(train_loader, k, start_batch=b)`` and sees exactly the same batches.
"""
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from .base import BatchKey, DataError, EpochBatchSampler, ShardSampler, TensorImageDataset
from .cifar import cifar_dataset
from .digits import digits_dataset, digits_split, digits_split_indices
from .imagefolder import imagefolder_dataset
from .transforms import BatchTransform, batch_generator, mix_seed, random_crop_flip

__all__ = ["DATASET_NAMES", "get_dataset", "make_loaders", "set_epoch", "BatchKey", "DataError",
           "EpochBatchSampler", "ShardSampler", "TensorImageDataset", "BatchTransform",
           "batch_generator", "mix_seed", "random_crop_flip", "digits_split",
           "digits_split_indices"]

DATASET_NAMES: Tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder")


def get_dataset(name: str, root: Optional[str] = None, train: bool = True, seed: int = 0,
                augment: bool = True, **kw) -> Dataset:
    """The train or test split of dataset ``name``.

    - "digits": scikit-learn 8x8 digits, items [1, 8, 8]; ``seed`` picks the stratified split
      (kw: test_fraction=0.2). ``root`` is ignored.
    - "cifar10" / "cifar100": items [3, 32, 32] from the pickle folder under ``root``
      (kw: padding=4); the split is fixed, ``seed`` unused.
    - "imagefolder": ``root/train`` or ``root/val``, items [3, 224, 224] (kw: image_size=224,
      resize=256); needs torchvision + Pillow.
    ``augment`` (train split only): random crop + flip for CIFAR, RandomResizedCrop + flip for
    ImageFolder, applied to batches requested with a BatchKey (see make_loaders). ``ds[i]`` always
    returns the un-augmented, normalized (x float32, y int64).
    The dataset has attributes num_classes and input_shape (C, H, W).
    Raises ValueError for an unknown name, FileNotFoundError for missing data (with instructions).
    """
    if name == "digits":
        return digits_dataset(train=train, seed=seed, **kw)
    if name in ("cifar10", "cifar100"):
        return cifar_dataset(name, root, train=train, augment=augment, **kw)
    if name == "imagefolder":
        return imagefolder_dataset(root, train=train, augment=augment, **kw)
    raise ValueError(f"saq.data.get_dataset: name={name!r} is not a known dataset; valid names: "
                     f"{', '.join(DATASET_NAMES)}")


def _world(distributed: bool, rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if not distributed:
        return 0, 1
    if rank is None or world_size is None:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("saq.data.make_loaders: distributed=True needs an initialized "
                               "process group (launch with torchrun and call "
                               "torch.distributed.init_process_group first), or explicit rank= "
                               "and world_size=; use distributed=False for one process")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if not 0 <= rank < world_size:
        raise ValueError(f"saq.data.make_loaders: need 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    return rank, world_size


def make_loaders(name: str, root: Optional[str] = None, batch_size: int = 128, seed: int = 0,
                 num_workers: int = 0, distributed: bool = False,
                 test_batch_size: Optional[int] = None, drop_last: bool = False,
                 augment: bool = True, pin_memory: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None, **dataset_kw
                 ) -> Tuple[DataLoader, DataLoader, dict]:
    """Train and test DataLoaders for dataset ``name`` plus an info dict.

    Both are plain torch DataLoaders with automatic batching off (``batch_size=None``) whose
    sampler is an EpochBatchSampler: it yields one BatchKey per batch and the dataset builds the
    whole batch (one gather for in-memory data, augmentation seeded by the key). Each loader
    yields (x [B, C, H, W] float32, y [B] int64); ``batch_size`` is per process.

    Train order: shuffled by a DistributedSampler(seed=seed) (with num_replicas=1 when not
    distributed), i.e. a pure function of (seed, epoch). Call ``set_epoch(loader, epoch)`` before
    each epoch; ``set_epoch(loader, epoch, start_batch=b)`` resumes mid-epoch. The last partial
    batch is kept unless ``drop_last``. Distributed ranks get equally many train batches (the
    sampler pads by repeating samples), as DDP needs.
    Test order: sequential; when distributed, rank r takes samples r, r + world, ... with no
    padding, so per-rank sums add up to exactly the test set.
    ``distributed=True`` takes rank and world size from the initialized process group unless
    ``rank``/``world_size`` are given. The loaders never consume the global RNG.

    info: name, num_classes, input_shape (C, H, W), train_size, test_size (whole splits),
    batch_size, test_batch_size, seed, rank, world_size, classes.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"saq.data.make_loaders: batch_size must be a positive int, "
                         f"got {batch_size!r}")
    test_batch_size = test_batch_size or batch_size
    rank, world_size = _world(distributed, rank, world_size)
    train_ds = get_dataset(name, root, train=True, seed=seed, augment=augment, **dataset_kw)
    test_ds = get_dataset(name, root, train=False, seed=seed, augment=augment, **dataset_kw)
    train_cls, test_cls = getattr(train_ds, "classes", None), getattr(test_ds, "classes", None)
    if train_cls is not None and test_cls is not None and list(train_cls) != list(test_cls):
        # an image folder numbers its classes by its own sorted subfolders: a val/ folder that
        # lacks (or adds) a class would shift every later label, silently
        raise DataError(
            f"saq.data.make_loaders: {name} test classes {list(test_cls)[:8]}... differ from the "
            f"training classes {list(train_cls)[:8]}...; give the test folder one subfolder per "
            f"training class, with the same names")

    train_idx = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=seed)
    test_idx = (ShardSampler(len(test_ds), rank, world_size) if world_size > 1
                else SequentialSampler(test_ds))

    def loader(ds, index_sampler, bs, drop):
        sampler = EpochBatchSampler(index_sampler, bs, drop_last=drop, seed=seed, rank=rank)
        if sampler.num_batches == 0 and len(ds) > 0:
            raise ValueError(
                f"saq.data.make_loaders: drop_last with batch_size {bs} leaves no batch of the "
                f"{len(index_sampler)} samples of rank {rank}; lower batch_size or drop_last=False")
        # A private generator: DataLoader draws a worker base seed per epoch from it, which
        # would otherwise advance the global RNG (and our batches do not use worker seeds).
        return DataLoader(ds, batch_size=None, sampler=sampler, num_workers=num_workers,
                          pin_memory=pin_memory, persistent_workers=num_workers > 0,
                          generator=torch.Generator().manual_seed(seed))

    info = dict(name=name, num_classes=train_ds.num_classes,
                input_shape=tuple(train_ds.input_shape), train_size=len(train_ds),
                test_size=len(test_ds), batch_size=batch_size, test_batch_size=test_batch_size,
                seed=seed, rank=rank, world_size=world_size,
                classes=getattr(train_ds, "classes", None))
    return (loader(train_ds, train_idx, batch_size, drop_last),
            loader(test_ds, test_idx, test_batch_size, False), info)


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select epoch ``epoch`` of a loader from make_loaders, starting at batch ``start_batch``
    (resume). Mutates ``loader.sampler``; same as ``loader.sampler.set_epoch(epoch, start_batch)``.
    """
    if not isinstance(loader.sampler, EpochBatchSampler):
        raise TypeError("saq.data.set_epoch: loader must come from saq.data.make_loaders "
                        f"(its sampler is {type(loader.sampler).__name__})")
    loader.sampler.set_epoch(epoch, start_batch)
