"""Data sets held in memory as tensors, binarized as the literature does, batched on the training device.

Every data set is a :class:`Dataset` of flattened images in [0, 1], shape ``(N, P)``, with
train/validation/test splits and labels (for plots). Batches come from a seeded permutation of
tensors already on the device: no per-item ``DataLoader`` on the hot path.

Names (:data:`DATASETS`):

- ``digits``: scikit-learn's 8x8 handwritten digits, embedded in scikit-learn (no network);
- ``mnist``, ``fashion-mnist``, ``kmnist``: 28x28 MNIST-format IDX files, read from ``data_dir``
  (the files themselves, or torchvision's ``<root>/<Class>/raw`` layout), else downloaded by
  torchvision into the cache folder;
- ``frey``: the Frey faces (1965 grey images of 28x20 pixels), ``frey_rawface.mat`` in ``data_dir``, from
  Sam Roweis' data page (:data:`FREY_URL`);
- any folder of MNIST-format IDX files (plain or gz) given as the name itself,
  e.g. ``/usr/share/datasets/fashion-mnist``.
"""

import gzip
import os
import shutil
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import ConfigError
from .programs import Batch

BINARIZE = ("none", "static", "dynamic", "threshold")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Datapoints as rows of tensors (flattened images in [0, 1] for the image sets), their labels and
    side inputs, split three ways.

    :param name: the data set's name.
    :param image_shape: ``(C, H, W)`` of one image (``x`` holds ``C * H * W`` pixels per row); None for
        data that are not images.
    :param train, val, test: ``(N, P)`` float tensors.
    :param train_labels, val_labels, test_labels: ``(N,)`` long tensors, or None.
    :param binarize: how the pixels were binarized; with ``"dynamic"`` the training images keep
        their grey levels and :func:`batches` draws a fresh binary image each time one is used,
        while validation and test images were binarized once (seeded) so that epochs compare.
    :param inputs: side inputs per split, ``{split: {name: (N, ...) tensor}}``: each batch carries the
        rows of its split's (a conditional model's labels, covariates), passed to the programs' parameters
        of those names.
    :param source: the arguments of :func:`load_dataset` that rebuild this data set (a run folder
        records them); None for data given as tensors.
    """

    name: str
    image_shape: Optional[tuple]
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: Optional[torch.Tensor] = None
    val_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    binarize: str = "none"
    inputs: dict = field(default_factory=dict)
    source: Optional[dict] = None

    @classmethod
    def from_tensors(cls, train: torch.Tensor, test: Optional[torch.Tensor] = None, val: Optional[torch.Tensor] = None,
                     inputs: Optional[dict] = None, name: str = "tensors", image_shape=None,
                     labels: Optional[dict] = None) -> "Dataset":
        """A data set from ``(N, ...)`` tensors; an absent split is empty.

        :param inputs: side inputs, ``{name: tensor}`` for the training split or
            ``{name: {"train": ..., "test": ..., "val": ...}}`` for several.
        :param labels: ``{split: (N,) tensor}``, for pictures coloured by class.
        """
        empty = train[:0]
        splits = {"train": train, "val": empty if val is None else val, "test": empty if test is None else test}
        by_split = {split: {} for split in SPLITS}
        for key, value in (inputs or {}).items():
            for split, tensor in (value if isinstance(value, dict) else {"train": value}).items():
                if split not in SPLITS:
                    raise ValueError(f"side input {key!r}: unknown split {split!r}, choose one of {', '.join(SPLITS)}")
                by_split[split][key] = tensor
        labels = labels or {}
        data = cls(name, tuple(image_shape) if image_shape is not None else None, **splits,
                   **{f"{s}_labels": labels.get(s) for s in SPLITS}, inputs=by_split)
        data.check_inputs()
        return data

    @property
    def num_pixels(self) -> int:
        return self.train[0].numel()

    @property
    def is_binary(self) -> bool:
        return self.binarize != "none"

    def split(self, name: str) -> tuple:
        """``(x, labels)`` of the split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: choose train, val or test")
        return getattr(self, name), getattr(self, f"{name}_labels")

    def split_inputs(self, name: str) -> dict:
        return dict(self.inputs.get(name, {}))

    def batch(self, split: str, rows=None) -> Batch:
        """The rows ``rows`` (all when None) of a split as a :class:`~pvae.programs.Batch`, with their
        side inputs; ``num_data`` is the split's size."""
        x, _ = self.split(split)
        inputs = self.split_inputs(split)
        if rows is None:
            return Batch.of(x, num_data=x.shape[0], inputs=inputs, split=split)
        idx = torch.arange(x.shape[0], device=x.device)[rows] if isinstance(rows, slice) else rows
        return Batch.of(x[idx], idx, x.shape[0], {k: v[idx] for k, v in inputs.items()}, split)

    def with_inputs(self, **inputs) -> "Dataset":
        """A copy with side inputs added, each ``{split: tensor}`` (or a tensor for the training split)."""
        by_split = {split: dict(self.inputs.get(split, {})) for split in SPLITS}
        for key, value in inputs.items():
            for split, tensor in (value if isinstance(value, dict) else {"train": value}).items():
                by_split[split][key] = tensor
        data = replace(self, inputs=by_split)
        data.check_inputs()
        return data

    def labels_as(self, name: str) -> "Dataset":
        """A copy whose labels are also the side input ``name`` of every split (a conditional model's y)."""
        missing = [s for s in SPLITS if self.split(s)[1] is None and self.split(s)[0].shape[0]]
        if missing:
            raise ValueError(f"data set {self.name!r} has no labels for its {', '.join(missing)} split")
        data = self.with_inputs(**{name: {s: self.split(s)[1] for s in SPLITS if self.split(s)[1] is not None}})
        if data.source is not None:
            data.source = {**data.source, "labels_as": name}
        return data

    def check_inputs(self) -> None:
        names = [set(self.inputs.get(s, {})) for s in SPLITS if self.split(s)[0].shape[0]]
        if names and any(n != names[0] for n in names):
            raise ValueError(f"every split must carry the same side inputs, got {names}")
        for split in SPLITS:
            x = self.split(split)[0]
            for key, value in self.inputs.get(split, {}).items():
                if not torch.is_tensor(value) or value.shape[:1] != x.shape[:1]:
                    got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(f"side input {key!r} of the {split} split must have one row per datapoint "
                                     f"({x.shape[0]}), got {got}")

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
            inputs={s: {k: move(v) for k, v in d.items()} for s, d in self.inputs.items()},
        )


def batches(data: Dataset, batch_size: int, generator: torch.Generator, split: str = "train",
            shard=None) -> Iterator[Batch]:
    """The batches of one epoch over a split, in the order of a seeded permutation, as
    :class:`~pvae.programs.Batch` es with their side inputs.

    ``idx`` are the rows' positions in the split. The last batch may be smaller. Training images of a
    dynamically binarized set are a fresh Bernoulli draw of their grey levels each time.

    :param shard: a rank's :class:`~pvae.distributed.Shard` in a data-parallel fit: the permutation is
        cut into chunks of ``shard.size`` x ``batch_size`` rows, the batches of one process with that
        batch size, and this rank gets its share of each chunk (possibly none of the last). Every rank
        draws the same numbers from ``generator``, so the ranks' generators stay alike.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    x, _ = data.split(split)
    inputs = data.split_inputs(split)
    dynamic = split == "train" and data.binarize == "dynamic"
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    parts = ((idx, None) for idx in perm.split(batch_size)) if shard is None else shard.chunks(perm, batch_size)
    for chunk, mine in parts:
        idx = chunk if mine is None else chunk[mine]
        if dynamic:  # the whole chunk is drawn on every rank: generators stay alike, draws match one process's
            xb = torch.bernoulli(x[chunk], generator=generator)
            xb = xb if mine is None else xb[mine]
        else:
            xb = x[idx]
        yield Batch(xb, idx, x.shape[0], {k: v[idx] for k, v in inputs.items()}, split)


# ----------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    data_dir: Optional[str] = None,
    binarize: str = "none",
    val_size: Optional[int] = None,
    seed: int = 0,
    download: bool = True,
    labels_as: Optional[str] = None,
) -> Dataset:
    """Load a data set by name (see the module docstring) or from a folder of IDX files.

    :param binarize: ``none``, ``static`` (one seeded Bernoulli draw), ``dynamic`` (a fresh draw per
        use, see :func:`batches`) or ``threshold`` (pixel >= 0.5, as Cremer et al. 2018).
    :param val_size: images taken from the end of the training set for validation; by default 5000
        for 28x28 sets (leaving MNIST's 55,000), 10% of the training set otherwise.
    :param seed: seeds the static binarization and the splits of sets that have no fixed test set;
        it is the data's seed, independent of the training seed, so that runs compare.
    :param labels_as: also give the labels as the side input of this name (a conditional model's y).
    """
    if binarize not in BINARIZE:
        raise ValueError(f"unknown binarization {binarize!r}: choose one of {', '.join(BINARIZE)}")
    if name in DATASETS:
        if data_dir is not None and name in EMBEDDED:
            raise ConfigError("data_dir", f"is not used by the {name} data set, which is embedded: leave it out")
        if data_dir is not None and not Path(data_dir).is_dir():
            where = f" (frey_rawface.mat, from {FREY_URL})" if name == "frey" else ""
            raise ConfigError("data_dir", f"{data_dir}: no such folder: give the folder that holds the {name} files{where}")
        loaded = DATASETS[name](data_dir, download)
    elif Path(name).is_dir():
        if data_dir is not None:
            raise ConfigError("data_dir", f"is not used when the data set is a folder ({name}): leave it out")
        loaded = _idx_folder(Path(name))
    else:
        raise ConfigError("dataset", f"{name!r} is unknown: choose one of {', '.join(DATASETS)}, or give a folder "
                          "of IDX files")
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
        raise ConfigError("val_size", f"must be in [0, {train_x.shape[0]}) for {name}, got {val_size}")
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
    data = binarize_dataset(data, binarize, seed)
    data.source = {"dataset": name, "data_dir": data_dir, "binarize": binarize, "val_size": val_size, "seed": seed}
    return data.labels_as(labels_as) if labels_as else data


def default_binarize(name: Optional[str]) -> str:
    """The binarization of data set ``name`` when a run names none (:data:`DEFAULT_BINARIZE`, else dynamic)."""
    return DEFAULT_BINARIZE.get(name, "dynamic")


def binarize_dataset(data: Dataset, mode: str, seed: int = 0) -> Dataset:
    """Binarize a grey-level data set; see :func:`load_dataset` for the modes."""
    if mode not in BINARIZE:
        raise ValueError(f"unknown binarization {mode!r}: choose one of {', '.join(BINARIZE)}")
    if data.binarize != "none":
        raise ValueError(f"data set {data.name!r} is already binarized ({data.binarize})")
    if mode == "none":
        return data
    for split in SPLITS:
        x = data.split(split)[0]
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):  # False for NaN too
            finite = x[torch.isfinite(x)]
            span = f"from {finite.min().item():g} to {finite.max().item():g}" if finite.numel() else "no finite ones"
            nan = ", and NaN or infinite ones" if finite.numel() < x.numel() else ""
            raise ValueError(f"binarizing ({mode}) needs values in [0, 1], but the {split} split of {data.name!r} "
                             f"holds values {span}{nan}: scale the data to [0, 1], or do not binarize (none)")
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
        created = _first_missing(root / cls_name)
        try:
            for train in (True, False):
                getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)
        except Exception as e:  # URLError, HTTPError, checksum errors: all mean "not here"
            if created is not None:  # a failed download leaves no folders behind
                shutil.rmtree(created, ignore_errors=True)
            raise RuntimeError(
                f"could not download {cache_name} into {root} ({e}); without network, put its four "
                f"IDX files ({', '.join(IDX_FILES.values())}, plain or .gz) in a folder and pass it "
                "as data_dir (--data-dir)"
            ) from e
        return _idx_folder(root / cls_name / "raw")

    return load


FREY_URL = "https://cs.nyu.edu/~roweis/data.html"


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost folder on the way to ``path`` that does not exist yet (what a download creates)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _frey(data_dir, download):
    """The Frey faces: 1965 grey images of 28x20 pixels, from ``frey_rawface.mat`` (Roweis' page)."""
    from scipy.io import loadmat

    path = Path(data_dir or ".") / "frey_rawface.mat"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: download frey_rawface.mat from Sam Roweis' data page, {FREY_URL}, and pass "
            "its folder as data_dir (--data-dir)"
        )
    ff = loadmat(str(path), squeeze_me=True, struct_as_record=False)["ff"]  # (560, 1965) uint8
    x = torch.as_tensor(np.ascontiguousarray(ff.T), dtype=torch.float32) / 255.0
    return x, None, None, None, (1, 28, 20)


EMBEDDED = ("digits",)  # data sets that read no files
# binarization of a data set whose run names none: the 8x8 digits keep their 17 grey levels (a Bernoulli
# draw of 64 pixels leaves a noisy blot, binarizing at 0.5 a stroke that breaks); the 28x28 sets are
# binarized dynamically, as the literature's benchmarks (Burda et al. 2015)
DEFAULT_BINARIZE = {"digits": "none"}
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
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a whole gzip file ({e or type(e).__name__}): download it again, or "
                         "give it uncompressed without the .gz") from None
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
