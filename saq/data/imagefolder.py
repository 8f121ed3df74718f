"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``), decoded with
torchvision + Pillow, which are optional dependencies of saq and imported only here."""
import os
from typing import Optional

import torch
from torch.utils.data import Dataset

from .base import BatchKey
from .transforms import IMAGENET_MEAN, IMAGENET_STD, mix_seed

__all__ = ["ImageFolderDataset", "imagefolder_dataset"]

_INSTALL = ("saq.data imagefolder: needs torchvision and Pillow, which saq does not install; "
            "run `pip install torchvision pillow` (a torchvision built for your torch version)")


def _torchvision():
    try:
        import PIL  # noqa: F401  (torchvision's ImageFolder decodes with Pillow)
        import torchvision
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return torchvision


class ImageFolderDataset(Dataset):
    """A torchvision ImageFolder with seeded augmentation.

    Train transform: RandomResizedCrop(image_size) + RandomHorizontalFlip; eval transform:
    Resize(resize) + CenterCrop(image_size); both end with ToTensor + ImageNet normalization.
    ``ds[i]`` -> (x [3, S, S] float32, y 0-dim int64) with the eval transform (no randomness).
    ``ds[key]`` (BatchKey) -> (x [B, 3, S, S], y [B]); with the train transform, sample i of the
    key is augmented under torch.manual_seed(mix_seed(seed, epoch, batch, rank, i)) inside
    torch.random.fork_rng, so torchvision's global-RNG draws are a pure function of the key and
    the caller's RNG state is left untouched.
    Attributes: num_classes, input_shape (3, S, S), classes.
    """

    def __init__(self, folder: str, train: bool, augment: bool = True, image_size: int = 224,
                 resize: int = 256):
        tv = _torchvision()
        T = tv.transforms
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.eval_transform = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *norm])
        self.train_transform = None
        if train and augment:
            self.train_transform = T.Compose(
                [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *norm])
        self.folder = tv.datasets.ImageFolder(folder)
        self.classes = self.folder.classes
        self.num_classes = len(self.classes)
        self.input_shape = (3, image_size, image_size)

    def __len__(self) -> int:
        return len(self.folder)

    def _load(self, i: int, key: Optional[BatchKey]):
        img, y = self.folder[i]
        if key is None or self.train_transform is None:
            return self.eval_transform(img), y
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(key.seed, key.epoch, key.batch, key.rank, i))
            return self.train_transform(img), y

    def __getitem__(self, key):
        if isinstance(key, BatchKey):
            xs, ys = zip(*(self._load(i, key) for i in key.indices))
            return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
        x, y = self._load(key, None)
        return x, torch.tensor(y, dtype=torch.long)


def imagefolder_dataset(root: str, train: bool = True, augment: bool = True,
                        image_size: int = 224, resize: int = 256) -> ImageFolderDataset:
    """``root/train`` (train=True) or ``root/val`` as an ImageFolderDataset.

    Raises ImportError with install instructions without torchvision/Pillow, FileNotFoundError
    when the split folder is missing.
    """
    _torchvision()
    if root is None:
        raise FileNotFoundError("saq.data imagefolder: pass root=DIR with DIR/train/<class>/... "
                                "and DIR/val/<class>/... image folders")
    folder = os.path.join(os.path.expanduser(str(root)), "train" if train else "val")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"saq.data imagefolder: {folder!r} is not a folder; expected the ImageNet layout "
            f"root/train/<class>/<image> and root/val/<class>/<image> (root={root!r})")
    return ImageFolderDataset(folder, train, augment, image_size, resize)
