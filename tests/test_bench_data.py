"""Tests for benchmarks.data (no dependency on /work/shared/data or the network)."""
import numpy as np
import pytest
import torch

from benchmarks.data import (DataNotFoundError, TensorLoader, balanced_subset, load_dataset,
                             make_loaders)


def _write_npz(folder, n_train=40, n_test=20, classes=10, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{split}.npz",
                 images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                 labels=(np.arange(n) % classes).astype(np.uint8))


def test_npz_layout_direct_and_subfolder(tmp_path):
    _write_npz(tmp_path / "cifar10")
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.train_images.shape == (40, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.in_channels == 3 and "npz" in ds.source
    ds2 = load_dataset("cifar10", str(tmp_path / "cifar10"), download=False, train_subset=20, test_subset=10)
    assert len(ds2.train_labels) == 20 and len(ds2.test_labels) == 10
    assert torch.bincount(ds2.train_labels).tolist() == [2] * 10


def test_npz_pixels_are_nhwc_transposed(tmp_path):
    _write_npz(tmp_path)
    raw = np.load(tmp_path / "train.npz")["images"]
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert torch.equal(ds.train_images[3], torch.from_numpy(raw[3]).permute(2, 0, 1))


def test_env_var_data_dir(tmp_path, monkeypatch):
    _write_npz(tmp_path / "cifar10")
    monkeypatch.setenv("DPM_DATA", str(tmp_path))
    assert load_dataset("cifar10", download=False).num_classes == 10


def test_cifar100_rejects_cifar10_labels(tmp_path):
    _write_npz(tmp_path / "cifar100")
    with pytest.raises(ValueError, match="CIFAR-10"):
        load_dataset("cifar100", str(tmp_path), download=False)


def test_missing_data_is_clear_and_fallback_says_one_line(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar10", str(tmp_path), download=False)
    msg = str(e.value)
    assert "train.npz" in msg and "unpack.py" in msg and "--dataset digits" in msg
    lines = []
    ds = load_dataset("cifar10", str(tmp_path), download=False, fallback=True, log=lines.append)
    assert ds.name == "digits" and len(lines) == 1 and "digits" in lines[0]
    assert ds.train_images.shape[1:] == (3, 32, 32)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="known: cifar10"):
        load_dataset("mnist-fancy")


def test_digits_and_synthetic():
    d = load_dataset("digits")
    assert d.num_classes == 10 and len(d.train_labels) + len(d.test_labels) == 1797
    assert d.train_images.shape[1:] == (3, 32, 32)
    d16 = load_dataset("digits", image_size=16)
    assert d16.image_size == 16
    s = load_dataset("synthetic")
    assert s.train_images.dtype == torch.uint8 and s.num_classes == 10


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(d / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", image_size=16)
    assert ds.num_classes == 2 and ds.train_images.shape == (6, 3, 16, 16) and len(ds.test_labels) == 6
    with pytest.raises(DataNotFoundError, match="train"):
        load_dataset(f"imagefolder:{tmp_path / 'train'}")


def test_loader_shapes_normalisation_and_augmentation():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(50) % 10
    plain = TensorLoader(imgs, labels, batch_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert len(plain) == 4
    xs = [x for x, _ in plain]
    assert xs[0].shape == (16, 3, 32, 32) and xs[-1].shape == (2, 3, 32, 32)
    assert torch.allclose(xs[0][0], (imgs[0].float() / 255 - 0.5) / 0.25)
    aug = TensorLoader(imgs, labels, batch_size=50, augment=True, seed=1, mean=(0.0,), std=(1.0,))
    x, y = next(iter(aug))
    assert x.shape == (50, 3, 32, 32) and torch.equal(y, labels)
    # each augmented image is a crop (with zero padding) of the original, possibly flipped
    for i in range(5):
        orig = torch.nn.functional.pad(imgs[i].float() / 255, (4, 4, 4, 4))
        found = False
        for flip in (False, True):
            src = orig.flip(2) if flip else orig
            for oy in range(9):
                for ox in range(9):
                    if torch.allclose(src[:, oy:oy + 32, ox:ox + 32], x[i]):
                        found = True
        assert found
    shuffled = TensorLoader(imgs, labels, batch_size=50, shuffle=True, seed=3)
    _, y1 = next(iter(shuffled))
    assert sorted(y1.tolist()) == sorted(labels.tolist()) and not torch.equal(y1, labels)


def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.arange(1000) % 10
    a, b = balanced_subset(labels, 105, seed=0), balanced_subset(labels, 105, seed=0)
    assert torch.equal(a, b) and len(a) == 105
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(balanced_subset(labels, None), torch.arange(1000))


def test_make_loaders():
    ds = load_dataset("synthetic", image_size=16)
    tr, te = make_loaders(ds, batch_size=32)
    x, y = next(iter(tr))
    assert x.shape == (32, 3, 16, 16) and y.dtype == torch.long
    assert len(te) >= 1
