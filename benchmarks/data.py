"""Data sets for the benchmarks, held in memory as uint8 tensors, with fast batched loaders.

Supported names (:data:`DATASET_NAMES`):

* ``cifar10`` / ``cifar100``. Looked up, in order, in the data folder (``data_dir`` argument,
  else the ``DPM_DATA`` environment variable, else ``./data``):

  1. the npz layout: ``train.npz`` and ``test.npz`` with ``images`` (uint8, N x 32 x 32 x 3,
     NHWC, RGB) and ``labels``, either directly in the folder or in its ``cifar10/`` (``cifar100/``)
     sub-folder. ``python /work/shared/data/cifar10/unpack.py DEST`` writes this layout;
  2. torchvision's own layout (``cifar-10-batches-py/`` or ``cifar-100-python/``);
  3. torchvision's download into the data folder (only when ``download=True``).

  When none of them works (e.g. the machine is offline) and ``fallback=True``, the scikit-learn
  digits data set is used instead and ONE line says so on stderr; with ``fallback=False`` a
  :class:`DataNotFoundError` says where it looked and what to do.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), upsampled
  (nearest) to ``image_size`` (default 32) and repeated to 3 channels, so CIFAR models run on it
  unchanged. Needs no download. Split 80/20 with a fixed, class-stratified permutation.
* ``synthetic``: random, but learnable, class-dependent images (for tests; no files).
* ``imagefolder:PATH`` or an existing folder ``PATH``: ``PATH/train/<class>/*`` and
  ``PATH/val/<class>/*`` (or ``test/``), decoded once with Pillow, resized to ``image_size``
  (default 32) and kept in memory.

Loaders (:class:`TensorLoader`) do standard CIFAR augmentation (random crop with 4-pixel zero
padding, horizontal flip) and per-channel normalisation on whole batches of tensors: no PIL and
no worker processes, which is what is fast on 2 CPU cores when the data fits in memory.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "DataNotFoundError",
    "Dataset",
    "TensorLoader",
    "load_dataset",
    "make_loaders",
    "default_data_dir",
    "balanced_subset",
]

DATASET_NAMES = ("cifar10", "cifar100", "digits", "synthetic", "imagefolder:PATH")

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class DataNotFoundError(FileNotFoundError):
    """The requested data set could not be found or downloaded."""


@dataclass
class Dataset:
    """A data set held in memory: uint8 NCHW images, int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: str = ""
    notes: list = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images, "
                f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes "
                f"(from {self.source})")


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------
class TensorLoader:
    """Mini-batches from in-memory uint8 NCHW images.

    Yields ``(x, y)``: ``x`` float32, normalised; with ``augment`` a random crop (zero padding
    ``pad`` pixels, as torchvision's ``RandomCrop(size, padding=pad)`` does before ``ToTensor``)
    and a random horizontal flip are applied per sample. ``shuffle`` draws a new order each epoch
    from a generator seeded with ``seed`` (so runs are reproducible).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128,
                 shuffle: bool = False, augment: bool = False, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,), drop_last: bool = False, seed: int = 0,
                 pad: int = 4, flip: bool = True, device: str = "cpu", channels_last: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("TensorLoader expects uint8 images of shape N x C x H x W")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.labels = labels.long()
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.pad = pad
        self.flip = flip
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        c = images.shape[1]
        mean, std = list(mean), list(std)
        if len(mean) == 1:
            mean, std = mean * c, std * c
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else (n + self.batch_size - 1) // self.batch_size

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=self.generator)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=self.generator)
            rows = (oy[:, None] + torch.arange(h)[None, :])  # b x h
            cols = (ox[:, None] + torch.arange(w)[None, :])  # b x w
            x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]
        if self.flip:
            mask = torch.rand(b, generator=self.generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx].float().div_(255.0)
            if self.augment:
                x = self._augment(x)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x.to(self.device), self.labels[idx].to(self.device)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``$DPM_DATA`` if set, else ``./data``."""
    env = os.environ.get("DPM_DATA")
    return Path(env).expanduser() if env else Path("data")


def balanced_subset(labels: torch.Tensor, n: Optional[int], seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced subset of ``n`` examples (all, in order, if ``n`` is None or
    not smaller than the data set). Fixed by ``seed``, independent of the run's seed, so that all
    methods and seeds of a comparison see the same examples."""
    total = len(labels)
    if n is None or n >= total:
        return torch.arange(total)
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    # round-robin over classes so any n is as balanced as possible
    picked, k = [], 0
    while len(picked) < n:
        for idx in per_class:
            if k < len(idx) and len(picked) < n:
                picked.append(int(idx[k]))
        k += 1
    return torch.tensor(sorted(picked), dtype=torch.long)


def _nhwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:  # N x H x W grey
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected N x H x W x C images, got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _load_npz_pair(folder: Path, name: str, num_classes: int):
    out = []
    for split in ("train", "test"):
        with np.load(folder / f"{split}.npz") as z:
            if "images" not in z or "labels" not in z:
                raise ValueError(f"{folder / (split + '.npz')} must hold arrays 'images' and 'labels', "
                                 f"found {list(z.keys())}")
            images, labels = z["images"], z["labels"]
        x = _nhwc_to_tensor(images)
        y = torch.from_numpy(labels.astype(np.int64))
        out += [x, y]
    top = int(max(out[1].max(), out[3].max()))
    if top >= num_classes:
        raise ValueError(f"{folder} has labels up to {top}, too many for {name} ({num_classes} classes)")
    if name == "cifar100" and top < 10:
        raise ValueError(f"{folder} has only {top + 1} label values: it looks like CIFAR-10, not CIFAR-100")
    return out


def _find_npz(root: Path, name: str) -> Optional[Path]:
    for folder in (root / name, root):
        if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
            return folder
    return None


def _load_torchvision_cifar(root: Path, name: str, download: bool):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    finally:
        socket.setdefaulttimeout(old)
    return (_nhwc_to_tensor(tr.data), torch.tensor(tr.targets, dtype=torch.long),
            _nhwc_to_tensor(te.data), torch.tensor(te.targets, dtype=torch.long))


def _channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    x = images[: min(len(images), 10000)].float().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _load_digits(image_size: int = 32, in_channels: int = 3) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a test/bench dependency
        raise DataNotFoundError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if image_size % 8 != 0 or image_size < 8:
        raise ValueError(f"digits image_size must be a multiple of 8 (8, 16, 32, ...), got {image_size}")
    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))  # N x 8 x 8
    x = x[:, None].repeat_interleave(image_size // 8, 2).repeat_interleave(image_size // 8, 3)
    x = x.repeat(1, in_channels, 1, 1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    # fixed stratified 80/20 split
    g = torch.Generator().manual_seed(1234)
    test_idx = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: len(idx) // 5])
    test_idx = torch.cat(test_idx).sort().values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    mean, std = _channel_stats(x[mask])
    return Dataset("digits", x[mask], y[mask], x[test_idx], y[test_idx], 10, mean, std,
                   source="scikit-learn load_digits (8x8, upsampled)")


def _load_synthetic(image_size: int = 32, in_channels: int = 3, num_classes: int = 10,
                    n_train: int = 512, n_test: int = 256) -> Dataset:
    """Class-dependent blobs plus noise: learnable in a few steps, no files needed."""
    g = torch.Generator().manual_seed(4321)
    protos = torch.rand(num_classes, in_channels, image_size, image_size, generator=g)
    protos = torch.nn.functional.avg_pool2d(protos, 5, 1, 2)  # smooth patterns
    protos = (protos - protos.amin()) / (protos.amax() - protos.amin())

    def make(n):
        y = torch.arange(n) % num_classes
        x = protos[y] * 0.7 + 0.3 * torch.rand(n, in_channels, image_size, image_size, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    mean, std = _channel_stats(xtr)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes, mean, std, source="synthetic (random)")


def _load_imagefolder(path: Path, image_size: int = 32, max_bytes: int = 4 << 30) -> Dataset:
    from PIL import Image

    if not path.is_dir():
        raise DataNotFoundError(f"ImageFolder path {path} does not exist or is not a folder")
    train_dir = path / "train"
    test_dir = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataNotFoundError(
            f"ImageFolder data needs {path}/train/<class>/<images> and {path}/val/<class>/<images> "
            f"(or test/); found: {sorted(p.name for p in path.iterdir())}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFoundError(f"{train_dir} has no class sub-folders")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif"}

    def files(split_dir):
        out = []
        for ci, c in enumerate(classes):
            d = split_dir / c
            if d.is_dir():
                out += [(f, ci) for f in sorted(d.iterdir()) if f.suffix.lower() in exts]
        return out

    tr_files, te_files = files(train_dir), files(test_dir)
    need = (len(tr_files) + len(te_files)) * 3 * image_size * image_size
    if need > max_bytes:
        raise ValueError(f"ImageFolder {path} at {image_size}x{image_size} needs {need / 2**30:.1f} GiB in "
                         f"memory; use a smaller --image-size or a subset of the folder")
    from tqdm import tqdm

    def decode(lst, desc):
        x = torch.empty(len(lst), 3, image_size, image_size, dtype=torch.uint8)
        for i, (f, _) in enumerate(tqdm(lst, desc=desc, leave=False, file=sys.stderr)):
            with Image.open(f) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                x[i] = torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())
        return x, torch.tensor([c for _, c in lst], dtype=torch.long)

    xtr, ytr = decode(tr_files, "decode train")
    xte, yte = decode(te_files, "decode test")
    if len(ytr) == 0 or len(yte) == 0:
        raise DataNotFoundError(f"no images found under {train_dir} or {test_dir}")
    mean, std = _channel_stats(xtr)
    return Dataset(f"imagefolder:{path}", xtr, ytr, xte, yte, len(classes), mean, std,
                   source=f"ImageFolder {path}")


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def load_dataset(name: str, data_dir: Optional[str] = None, *, train_subset: Optional[int] = None,
                 test_subset: Optional[int] = None, download: bool = True, fallback: bool = False,
                 image_size: Optional[int] = None, subset_seed: int = 0, log=None) -> Dataset:
    """Load a data set by name into memory (see the module docstring for names and search order).

    ``train_subset`` / ``test_subset``: class-balanced subsets of that many examples (fixed by
    ``subset_seed``, not by the run's seed). ``fallback``: when CIFAR cannot be found or
    downloaded, use digits and print one line saying so (to ``log``, default stderr).
    """
    if log is None:
        def log(msg):
            print(msg, file=sys.stderr)
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string; known: {', '.join(DATASET_NAMES)}")
    key = name.strip()
    low = key.lower().replace("-", "")
    ds: Dataset
    if low in ("cifar10", "cifar100"):
        root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        num_classes = _NUM_CLASSES[low]
        npz = _find_npz(root, low)
        errors = []
        ds = None
        if npz is not None:
            xtr, ytr, xte, yte = _load_npz_pair(npz, low, num_classes)
            ds = Dataset(low, xtr, ytr, xte, yte, num_classes, *_CIFAR_STATS[low], source=f"npz {npz}")
        else:
            try:
                xtr, ytr, xte, yte = _load_torchvision_cifar(root, low, download=download)
                ds = Dataset(low, xtr, ytr, xte, yte, num_classes, *_CIFAR_STATS[low],
                             source=f"torchvision {root}")
            except Exception as e:  # not found, offline, corrupt archive ...
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        if ds is None:
            where = (f"{root}/{low}/{{train,test}}.npz, {root}/{{train,test}}.npz, "
                     f"torchvision layout in {root}" + (" and its download" if download else ""))
            if fallback:
                ds = _load_digits(image_size or 32)
                log(f"note: {low} not found ({where}); falling back to scikit-learn digits "
                    f"({len(ds.train_labels)} train / {len(ds.test_labels)} test, 8x8 upsampled to "
                    f"{ds.image_size}x{ds.image_size}x3)")
                ds.notes.append(f"fallback from {low}")
            else:
                hint = ("python /work/shared/data/cifar10/unpack.py DIR (or any folder with train.npz/test.npz), "
                        "then pass --data-dir DIR or set DPM_DATA=DIR; or use --dataset digits")
                raise DataNotFoundError(f"{low} not found: looked for {where} ({'; '.join(errors)}). "
                                        f"To fix: {hint}")
    elif low == "digits":
        ds = _load_digits(image_size or 32)
    elif low == "synthetic":
        ds = _load_synthetic(image_size or 32)
    elif low.startswith("imagefolder:") or (("/" in key or os.sep in key) and Path(key).expanduser().is_dir()):
        path = Path(key.split(":", 1)[1] if low.startswith("imagefolder:") else key).expanduser()
        ds = _load_imagefolder(path, image_size or 32)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)} "
                         f"(an ImageFolder is given as imagefolder:/path/to/folder)")

    if image_size and ds.image_size != image_size and low in ("cifar10", "cifar100"):
        ds.train_images = _resize_u8(ds.train_images, image_size)
        ds.test_images = _resize_u8(ds.test_images, image_size)
    if train_subset is not None or test_subset is not None:
        tr = balanced_subset(ds.train_labels, train_subset, subset_seed)
        te = balanced_subset(ds.test_labels, test_subset, subset_seed + 1)
        ds.train_images, ds.train_labels = ds.train_images[tr].contiguous(), ds.train_labels[tr]
        ds.test_images, ds.test_labels = ds.test_images[te].contiguous(), ds.test_labels[te]
    return ds


def _resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def make_loaders(ds: Dataset, batch_size: int = 128, test_batch_size: int = 512, seed: int = 0,
                 augment: bool = True, device: str = "cpu",
                 channels_last: bool = False) -> Tuple[TensorLoader, TensorLoader]:
    """(train_loader, test_loader): the train loader shuffles (seeded) and augments (random crop +
    flip for CIFAR-style data; digits and synthetic data only get the crop, no flip).
    ``channels_last``: batches in NHWC memory format (faster convolutions on CPU)."""
    flip = ds.name not in ("digits", "synthetic")
    pad = 4 if ds.image_size >= 16 else 1
    train = TensorLoader(ds.train_images, ds.train_labels, batch_size, shuffle=True, augment=augment,
                         mean=ds.mean, std=ds.std, seed=seed, pad=pad, flip=flip, device=device,
                         channels_last=channels_last)
    test = TensorLoader(ds.test_images, ds.test_labels, test_batch_size, shuffle=False, augment=False,
                        mean=ds.mean, std=ds.std, device=device, channels_last=channels_last)
    return train, test
