"""Data sets held in memory as tensors, binarized as the literature does, batched on the training device.

Every data set is a :class:`Dataset` of flattened images in [0, 1], shape ``(N, P)``, with
train/validation/test splits and labels (for plots). Batches come from a seeded permutation of
tensors already on the device: no per-item ``DataLoader`` on the hot path.

Names (:data:`DATASETS`):

- ``digits``: scikit-learn's 8x8 handwritten digits, embedded in scikit-learn (no network);
- ``mnist``, ``fashion-mnist``, ``kmnist``: 28x28 MNIST-format IDX files, read from ``data_dir``
  (the files themselves, or torchvision's ``<root>/<Class>/raw`` layout), else downloaded by
  torchvision into the cache folder;
- ``frey``: the Frey faces (20x28, 1965 images), ``frey_rawface.mat`` in ``data_dir``;
- any folder of MNIST-format IDX files (plain or gz) given as the name itself,
  e.g. ``/usr/share/datasets/fashion-mnist``.
"""

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

BINARIZE = ("none", "static", "dynamic", "threshold")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Dataset:
    """Flattened images in [0, 1] and their labels, split three ways.

    :param name: the data set's name.
    :param image_shape: ``(C, H, W)`` of one image; ``x`` holds ``C * H * W`` pixels per row.
    :param train, val, test: ``(N, P)`` float tensors.
    :param train_labels, val_labels, test_labels: ``(N,)`` long tensors, or None.
    :param binarize: how the pixels were binarized; with ``"dynamic"`` the training images keep
        their grey levels and :func:`batches` draws a fresh binary image each time one is used,
        while validation and test images were binarized once (seeded) so that epochs compare.
    """

    name: str
    image_shape: tuple
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: Optional[torch.Tensor] = None
    val_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    binarize: str = "none"

    @property
    def num_pixels(self) -> int:
        return self.train.shape[1]

    @property
    def is_binary(self) -> bool:
        return self.binarize != "none"

    def split(self, name: str) -> tuple:
        """``(x, labels)`` of the split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: choose train, val or test")
        return getattr(self, name), getattr(self, f"{name}_labels")

    def to(self, device) -> "Dataset":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            train=move(self.train),
            val=move(self.val),
            test=move(self.test),
            train_labels=move(self.train_labels),
            val_labels=move(self.val_labels),
            test_labels=move(self.test_labels),
        )


def batches(
    x: torch.Tensor, batch_size: int, generator: torch.Generator, dynamic_binarize: bool = False
) -> Iterator[tuple]:
    """Yield ``(idx, x[idx])`` over one epoch, in the order of a seeded permutation.

    ``idx`` are the rows' positions in ``x``: the subsample of the ``"data"`` plate. The last batch
    may be smaller. With ``dynamic_binarize`` each batch is a fresh Bernoulli draw of its grey levels.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    for idx in perm.split(batch_size):
        xb = x[idx]
        if dynamic_binarize:
            xb = torch.bernoulli(xb, generator=generator)
        yield idx, xb


# ----------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    data_dir: Optional[str] = None,
    binarize: str = "none",
    val_size: Optional[int] = None,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load a data set by name (see the module docstring) or from a folder of IDX files.

    :param binarize: ``none``, ``static`` (one seeded Bernoulli draw), ``dynamic`` (a fresh draw per
        use, see :func:`batches`) or ``threshold`` (pixel >= 0.5, as Cremer et al. 2018).
    :param val_size: images taken from the end of the training set for validation; by default 5000
        for 28x28 sets (leaving MNIST's 55,000), 10% of the training set otherwise.
    :param seed: seeds the static binarization and the splits of sets that have no fixed test set;
        it is the data's seed, independent of the training seed, so that runs compare.
    """
    if binarize not in BINARIZE:
        raise ValueError(f"unknown binarization {binarize!r}: choose one of {', '.join(BINARIZE)}")
    if name in DATASETS:
        loaded = DATASETS[name](data_dir, download)
    elif Path(name).is_dir():
        loaded = _idx_folder(Path(name))
    else:
        raise ValueError(
            f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}, or give a folder of IDX files"
        )
    train_x, train_y, test_x, test_y, image_shape = loaded
    if test_x is None:  # no official test set: split one off, seeded
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(train_x.shape[0], generator=g)
        n_test = train_x.shape[0] // 5
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        test_x, test_y = train_x[test_idx], _take(train_y, test_idx)
        train_x, train_y = train_x[train_idx], _take(train_y, train_idx)
    if val_size is None:
        val_size = 5000 if train_x.shape[0] >= 50000 else train_x.shape[0] // 10
    if not 0 <= val_size < train_x.shape[0]:
        raise ValueError(f"val_size must be in [0, {train_x.shape[0]}), got {val_size}")
    n_train = train_x.shape[0] - val_size
    data = Dataset(
        name=Path(name).name if name not in DATASETS else name,
        image_shape=tuple(image_shape),
        train=train_x[:n_train],
        val=train_x[n_train:],
        test=test_x,
        train_labels=_take(train_y, slice(0, n_train)),
        val_labels=_take(train_y, slice(n_train, None)),
        test_labels=test_y,
    )
    return binarize_dataset(data, binarize, seed)


def binarize_dataset(data: Dataset, mode: str, seed: int = 0) -> Dataset:
    """Binarize a grey-level data set; see :func:`load_dataset` for the modes."""
    if mode not in BINARIZE:
        raise ValueError(f"unknown binarization {mode!r}: choose one of {', '.join(BINARIZE)}")
    if data.binarize != "none":
        raise ValueError(f"data set {data.name!r} is already binarized ({data.binarize})")
    if mode == "none":
        return data
    if mode == "threshold":
        binary = lambda x: (x >= 0.5).to(x.dtype)  # noqa: E731
    else:
        g = torch.Generator(device=data.train.device).manual_seed(seed)
        binary = lambda x: torch.bernoulli(x, generator=g)  # noqa: E731
    return replace(
        data,
        train=data.train if mode == "dynamic" else binary(data.train),
        val=binary(data.val),
        test=binary(data.test),
        binarize=mode,
    )


def _take(labels, index):
    return None if labels is None else labels[index]


def _digits(data_dir, download):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    return x, y, None, None, (1, 8, 8)


def _torchvision_idx(cls_name: str, cache_name: str):
    def load(data_dir, download):
        roots = [Path(data_dir)] if data_dir else []
        roots.append(Path(os.environ.get("PVAE_CACHE", Path.home() / ".cache" / "pvae")) / cache_name)
        candidates = [p for r in roots for p in (r, r / cls_name / "raw")]
        for folder in candidates:
            if _has_idx(folder):
                return _idx_folder(folder)
        if not download:
            raise FileNotFoundError(
                f"no {cache_name} IDX files in {', '.join(map(str, candidates))} and download is off"
            )
        import torchvision.datasets

        root = roots[0]
        try:
            for train in (True, False):
                getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)
        except Exception as e:  # URLError, HTTPError, checksum errors: all mean "not here"
            raise RuntimeError(
                f"could not download {cache_name} into {root} ({e}); without network, put its four "
                f"IDX files ({', '.join(IDX_FILES.values())}, plain or .gz) in a folder and pass it "
                "as data_dir (--data-dir)"
            ) from e
        return _idx_folder(root / cls_name / "raw")

    return load


def _frey(data_dir, download):
    """The Frey faces: 1965 grey 20x28 images, from ``frey_rawface.mat`` (Roweis' page)."""
    from scipy.io import loadmat

    path = Path(data_dir or ".") / "frey_rawface.mat"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: download frey_rawface.mat from Sam Roweis' data page and pass its "
            "folder as data_dir (--data-dir)"
        )
    ff = loadmat(str(path), squeeze_me=True, struct_as_record=False)["ff"]  # (560, 1965) uint8
    x = torch.as_tensor(np.ascontiguousarray(ff.T), dtype=torch.float32) / 255.0
    return x, None, None, None, (1, 28, 20)


DATASETS = {
    "digits": _digits,
    "mnist": _torchvision_idx("MNIST", "mnist"),
    "fashion-mnist": _torchvision_idx("FashionMNIST", "fashion-mnist"),
    "kmnist": _torchvision_idx("KMNIST", "kmnist"),
    "frey": _frey,
}


# ----------------------------------------------------------------------------- IDX files


def read_idx(path) -> np.ndarray:
    """Read one IDX file (plain or gzip), as in LeCun's MNIST format: magic, dims, big-endian data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[code], offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values (truncated?)")
    return data.reshape(shape).astype(dtypes[code][1:])


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_idx(folder: Path) -> bool:
    return all(_find_idx(folder, stem) for stem in IDX_FILES.values())


def _idx_folder(folder: Path):
    files = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in files.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the IDX files {', '.join(missing)} (plain or .gz)")
    arrays = {key: read_idx(p) for key, p in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError(f"{folder}: train and test images differ in size")

    def images(a):
        return torch.as_tensor(a.reshape(a.shape[0], -1), dtype=torch.float32) / 255.0

    def labels(a):
        return torch.as_tensor(a, dtype=torch.long)

    return (
        images(arrays["train_images"]),
        labels(arrays["train_labels"]),
        images(arrays["test_images"]),
        labels(arrays["test_labels"]),
        (1, *arrays["train_images"].shape[1:]),
    )
