"""saq.data: digits split, loader determinism per (seed, epoch) and exact resume, batched
augmentation, CIFAR pickle folders (real layout, faked tiny), errors."""
import os
import pickle

import numpy as np
import pytest
import torch

from saq.data import (DATASET_NAMES, BatchKey, BatchTransform, digits_split,
                      digits_split_indices, get_dataset, make_loaders, mix_seed,
                      random_crop_flip, set_epoch)
from saq.data.transforms import CIFAR10_MEAN, CIFAR10_STD


def _epoch(loader, epoch, start_batch=0):
    set_epoch(loader, epoch, start_batch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


# ---------------------------------------------------------------- digits

def test_digits_split_shapes_and_normalization():
    x_tr, y_tr, x_te, y_te = digits_split(seed=0)
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert set(y_tr.tolist()) == set(range(10))
    assert abs(x_tr.mean().item()) < 1e-4 and abs(x_tr.std().item() - 1) < 1e-3


def test_digits_split_deterministic_disjoint_stratified():
    tr0, te0 = digits_split_indices(seed=0)
    tr0b, te0b = digits_split_indices(seed=0)
    tr1, _ = digits_split_indices(seed=1)
    assert np.array_equal(tr0, tr0b) and np.array_equal(te0, te0b)
    assert not np.array_equal(np.sort(tr0), np.sort(tr1))
    assert not set(tr0) & set(te0) and len(set(tr0) | set(te0)) == 1797
    a, b = digits_split(seed=3), digits_split(seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # Stratified: every class keeps about 20% of its images in the test part.
    counts = np.bincount(a[3].numpy(), minlength=10) / np.bincount(
        np.concatenate([a[1].numpy(), a[3].numpy()]), minlength=10)
    assert np.all(np.abs(counts - 0.2) < 0.02)


def test_digits_dataset_items():
    ds = get_dataset("digits", train=False)
    assert len(ds) == 360 and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    x, y = ds[5]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64 and y.ndim == 0
    xb, yb = ds[BatchKey((5, 7))]
    assert torch.equal(xb[0], x) and torch.equal(yb[0], y) and xb.shape == (2, 1, 8, 8)


# ---------------------------------------------------------------- loaders

def test_loader_shapes_and_info():
    train, test, info = make_loaders("digits", batch_size=100, seed=0)
    assert info["num_classes"] == 10 and info["input_shape"] == (1, 8, 8)
    assert info["train_size"] == 1437 and info["test_size"] == 360
    assert len(train) == 15 and len(test) == 4
    batches = _epoch(train, 0)
    assert [x.shape[0] for x, _ in batches] == [100] * 14 + [37]
    assert batches[0][0].shape == (100, 1, 8, 8) and batches[0][1].dtype == torch.int64
    # Test loader: sequential, the whole split exactly once.
    ys = torch.cat([y for _, y in test])
    assert torch.equal(ys, test.dataset.labels)


def test_loader_order_is_pure_function_of_seed_and_epoch():
    a, _, _ = make_loaders("digits", batch_size=64, seed=5)
    b, _, _ = make_loaders("digits", batch_size=64, seed=5)
    c, _, _ = make_loaders("digits", batch_size=64, seed=6)
    e2 = _epoch(a, 2)
    _epoch(b, 0)  # other epochs in between change nothing
    assert _same(e2, _epoch(b, 2))
    assert not _same(e2, _epoch(a, 3))
    assert not _same(e2, _epoch(c, 2))
    # The documented rule: order of epoch k = randperm(N) with a generator seeded seed + k.
    perm = torch.randperm(1437, generator=torch.Generator().manual_seed(5 + 2))
    assert torch.equal(torch.cat([y for _, y in e2]), a.dataset.labels[perm])


def test_loader_resume_mid_epoch_and_global_rng_untouched():
    train, _, _ = make_loaders("digits", batch_size=64, seed=0)
    full = _epoch(train, 4)
    state = torch.get_rng_state()
    resumed = _epoch(train, 4, start_batch=10)
    assert torch.equal(state, torch.get_rng_state())
    assert len(train) == len(full) - 10 and _same(resumed, full[10:])
    set_epoch(train, 5)
    assert len(train) == len(full)
    with pytest.raises(ValueError, match="start_batch"):
        set_epoch(train, 5, start_batch=len(full) + 1)


def test_loader_workers_match_main_process():
    a, _, _ = make_loaders("digits", batch_size=256, seed=1, num_workers=0)
    b, _, _ = make_loaders("digits", batch_size=256, seed=1, num_workers=1)
    assert _same(_epoch(a, 1), _epoch(b, 1))


def test_distributed_shards_with_explicit_rank():
    loaders = [make_loaders("digits", batch_size=64, seed=0, distributed=True, rank=r,
                            world_size=2) for r in range(2)]
    train_batches = [len(tr) for tr, _, _ in loaders]
    assert train_batches[0] == train_batches[1] == 12  # ceil(ceil(1437 / 2) / 64)
    ys = [torch.cat([y for _, y in _epoch(tr, 0)]) for tr, _, _ in loaders]
    assert len(ys[0]) == len(ys[1]) == 719  # padded by one repeated sample
    # Test shards cover the test set exactly once, no padding.
    test_ys = [torch.cat([y for _, y in te]) for _, te, _ in loaders]
    assert len(test_ys[0]) + len(test_ys[1]) == 360
    assert torch.equal(torch.stack([test_ys[0], test_ys[1]], 1).flatten(),
                       loaders[0][1].dataset.labels)


def test_distributed_without_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_loaders("digits", batch_size=8, distributed=True)


def test_unknown_dataset_and_bad_batch_size():
    with pytest.raises(ValueError) as e:
        get_dataset("mnist")
    assert "mnist" in str(e.value) and all(n in str(e.value) for n in DATASET_NAMES)
    with pytest.raises(ValueError, match="mnist"):
        make_loaders("mnist", batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders("digits", batch_size=0)


# ---------------------------------------------------------------- augmentation

def _reference_crop_flip(x, padding, seed):
    """Per-sample loop with the documented draw order: tops [B], lefts [B], flips [B]."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    top = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.randint(0, 2, (b,), generator=g).bool()
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    out = []
    for i in range(b):
        crop = xp[i, :, top[i]:top[i] + h, left[i]:left[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_loop(dtype):
    x = torch.randint(0, 256, (9, 3, 7, 5)).to(dtype)  # odd, non-square
    out = random_crop_flip(x, 2, generator=torch.Generator().manual_seed(11))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, _reference_crop_flip(x, 2, 11))


def test_random_crop_flip_determinism_and_identity():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(random_crop_flip(x, 4, generator=g(1)),
                       random_crop_flip(x, 4, generator=g(1)))
    assert not torch.equal(random_crop_flip(x, 4, generator=g(1)),
                           random_crop_flip(x, 4, generator=g(2)))
    assert torch.equal(random_crop_flip(x, 0, flip=False, generator=g(3)), x)
    flipped = random_crop_flip(x, 0, flip=True, generator=g(3))
    for i in range(16):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_batch_transform_normalizes_uint8():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = BatchTransform(CIFAR10_MEAN, CIFAR10_STD, train=False)(x)
    m = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - m) / s)
    train_tf = BatchTransform(CIFAR10_MEAN, CIFAR10_STD, train=True)
    assert torch.equal(train_tf(x, None), out)  # no generator: no augmentation
    assert train_tf(x, torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)


def test_mix_seed():
    assert mix_seed(0, 1) != mix_seed(1, 0) and mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert 0 <= mix_seed(-1, 2**70) < 2**63


# ---------------------------------------------------------------- CIFAR

def _write_fake_cifar(root, name, n=10, protocol=pickle.HIGHEST_PROTOCOL):
    """Tiny folder in the official layout: n images per pickle file, labels i % classes."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key, classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in
                                                               range(1, 6)] + ["test_batch"], \
            b"labels", 10
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder, files, key, classes = "cifar-100-python", ["train", "test"], b"fine_labels", 100
        meta = ("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    path = os.path.join(root, folder)
    os.makedirs(path)
    for f in files:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             key: [i % classes for i in range(n)], b"batch_label": b"fake"}
        blob = pickle.dumps(d, protocol=protocol)
        if protocol == 2:  # the module path older numpy (and the official files) use
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        with open(os.path.join(path, f), "wb") as fh:
            fh.write(blob)
    with open(os.path.join(path, meta[0]), "wb") as fh:
        pickle.dump(meta[1], fh, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_fake_folder(tmp_path, protocol):
    path = _write_fake_cifar(str(tmp_path), "cifar10", protocol=protocol)
    train, test, info = make_loaders("cifar10", root=str(tmp_path), batch_size=4, seed=0)
    assert info["num_classes"] == 10 and info["input_shape"] == (3, 32, 32)
    assert info["train_size"] == 50 and info["test_size"] == 10
    assert info["classes"][:2] == ["c0", "c1"]
    # Test images: exactly the normalized stored pixels, channel-major as in the pickle.
    with open(os.path.join(path, "test_batch"), "rb") as fh:
        raw = pickle.load(fh)[b"data"]
    x = torch.cat([x for x, _ in test])
    expected = BatchTransform(CIFAR10_MEAN, CIFAR10_STD)(
        torch.from_numpy(raw).view(10, 3, 32, 32))
    assert torch.equal(x, expected)
    # Train batches are augmented, and reproducible per (seed, epoch).
    e0 = _epoch(train, 0)
    assert e0[0][0].shape == (4, 3, 32, 32) and e0[0][0].dtype == torch.float32
    again, _, _ = make_loaders("cifar10", root=path, batch_size=4, seed=0)  # root = the folder
    assert _same(e0, _epoch(again, 0)) and not _same(e0, _epoch(again, 1))
    plain = get_dataset("cifar10", str(tmp_path), train=True, augment=False)
    key = BatchKey(tuple(range(8)), seed=0, epoch=0, batch=0)
    assert not torch.equal(train.dataset[key][0], plain[key][0])


def test_cifar100_fake_folder(tmp_path):
    _write_fake_cifar(str(tmp_path), "cifar100", n=12)
    ds = get_dataset("cifar100", str(tmp_path), train=True)
    assert ds.num_classes == 100 and len(ds) == 12 and ds.classes[5] == "f5"
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y.item() == 3


@pytest.mark.parametrize("name,folder,archive", [
    ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz")])
def test_cifar_missing_folder_message(tmp_path, name, folder, archive):
    with pytest.raises(FileNotFoundError) as e:
        make_loaders(name, root=str(tmp_path / "data"), batch_size=8)
    msg = str(e.value)
    assert folder in msg and archive in msg and "https://www.cs.toronto.edu/~kriz/" in msg
    assert "tar -xzf" in msg and str(tmp_path / "data") in msg
    with pytest.raises(FileNotFoundError, match=folder):
        get_dataset(name, root=None)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_refuses_code(tmp_path):
    path = _write_fake_cifar(str(tmp_path), "cifar10")
    with open(os.path.join(path, "test_batch"), "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": []}, fh)
    from saq.data import DataError

    with pytest.raises(DataError, match="refusing to load global builtins.print") as info:
        get_dataset("cifar10", str(tmp_path), train=False)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


# ---------------------------------------------------------------- ImageFolder

def test_imagefolder_without_torchvision(tmp_path):
    try:
        import PIL  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torchvision"):
            get_dataset("imagefolder", str(tmp_path))
    else:
        with pytest.raises(FileNotFoundError, match="train"):
            get_dataset("imagefolder", str(tmp_path))


def test_test_classes_must_match_the_training_classes(monkeypatch):
    # an image folder numbers its classes by its own subfolders: a val/ without "dog" would label
    # "fox" as training class 1 ("dog")
    import saq.data as D

    class Fake(torch.utils.data.Dataset):
        def __init__(self, classes):
            self.classes, self.num_classes, self.input_shape = classes, len(classes), (3, 4, 4)

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), 0

    sets = {True: Fake(["cat", "dog", "fox"]), False: Fake(["cat", "fox"])}
    monkeypatch.setattr(D, "get_dataset", lambda name, root, train, **kw: sets[train])
    with pytest.raises(D.DataError, match="test classes .* differ from the training classes"):
        D.make_loaders("imagefolder", "/nowhere", batch_size=2)
    sets[False] = Fake(["cat", "dog", "fox"])
    D.make_loaders("imagefolder", "/nowhere", batch_size=2)


def test_item_access_copies_and_drop_last_needs_a_batch():
    import saq.data as D

    ds = D.TensorImageDataset(torch.randn(5, 1, 2, 2), torch.arange(5), num_classes=5)
    x, _ = ds[1]
    x.zero_()
    assert ds.images[1].abs().sum() > 0  # the stored image is untouched
    with pytest.raises(ValueError, match="drop_last with batch_size 4096 leaves no batch"):
        D.make_loaders("digits", batch_size=4096, drop_last=True)
