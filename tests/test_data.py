import gzip
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import assert_close

from pvae.data import IDX_FILES, Dataset, batches, load_dataset, read_idx


def write_idx(path, array: np.ndarray, gz: bool = False):
    """An IDX file as LeCun describes it: two zero bytes, the type 0x08 (ubyte), ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def idx_folder(folder, n_train=30, n_test=10, size=(28, 28), gz_train=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *size)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, *size)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(folder / IDX_FILES[key], array, gz=gz_train and key.startswith("train"))
    return arrays


def test_idx_files_plain_and_gz_load_with_splits_and_labels(tmp_path):
    arrays = idx_folder(tmp_path)
    data = load_dataset(str(tmp_path), val_size=5)
    assert data.image_shape == (1, 28, 28)
    train = torch.as_tensor(arrays["train_images"].reshape(30, -1), dtype=torch.float32) / 255
    assert_close(data.train, train[:25])
    assert_close(data.val, train[25:])
    assert_close(data.test, torch.as_tensor(arrays["test_images"].reshape(10, -1), dtype=torch.float32) / 255)
    assert data.train_labels.tolist() == arrays["train_labels"][:25].tolist()
    assert data.test_labels.tolist() == arrays["test_labels"].tolist()


def test_named_sets_read_files_from_data_dir_in_torchvision_layout(tmp_path):
    idx_folder(tmp_path / "FashionMNIST" / "raw", size=(28, 28))
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path), download=False, val_size=0)
    assert data.train.shape == (30, 784) and data.test.shape == (10, 784)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="download is off"):
        load_dataset("mnist", data_dir=str(tmp_path), download=False)
    idx_folder(tmp_path)
    (tmp_path / (IDX_FILES["test_labels"])).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset(str(tmp_path))


def test_bad_idx_files_are_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    path = write_idx(tmp_path / "short", np.zeros((4, 3)))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="threshold"):
        load_dataset("digits", binarize="otsu")


def test_digits_are_embedded_and_split_three_ways():
    data = load_dataset("digits")
    assert data.image_shape == (1, 8, 8)
    assert data.train.shape[0] + data.val.shape[0] + data.test.shape[0] == 1797
    assert 0 <= data.train.min() and data.train.max() == 1.0
    assert data.test_labels.shape == (data.test.shape[0],)


def test_binarizations():
    grey = load_dataset("digits")
    threshold = load_dataset("digits", binarize="threshold")
    assert torch.equal(threshold.train, (grey.train >= 0.5).float())
    static_a, static_b = load_dataset("digits", binarize="static"), load_dataset("digits", binarize="static", seed=0)
    assert torch.equal(static_a.train, static_b.train), "static binarization is seeded"
    assert set(static_a.train.unique().tolist()) == {0.0, 1.0}
    # pixels with grey level p come out 1 with frequency p (binomial, 6 standard errors)
    mask = (grey.train > 0.2) & (grey.train < 0.8)
    freq, p = static_a.train[mask].mean(), grey.train[mask].mean()
    assert abs(freq - p) < 6 * (p * (1 - p) / mask.sum()) ** 0.5
    dynamic = load_dataset("digits", binarize="dynamic")
    assert torch.equal(dynamic.train, grey.train), "dynamic keeps the grey levels for fresh draws"
    assert set(dynamic.test.unique().tolist()) == {0.0, 1.0}, "test images are binarized once"


def test_batches_cover_every_row_once_with_their_side_inputs_and_dynamic_draws_change():
    x, y = torch.rand(10, 4), torch.arange(10) * 7
    data = Dataset.from_tensors(x, inputs={"y": y})
    g = torch.Generator().manual_seed(0)
    seen = list(batches(data, 3, g))
    assert [len(b) for b in seen] == [3, 3, 3, 1]
    idx = torch.cat([b.idx for b in seen])
    assert sorted(idx.tolist()) == list(range(10))
    for b in seen:
        assert torch.equal(b.x, x[b.idx]) and torch.equal(b.inputs["y"], y[b.idx])
        assert b.num_data == 10 and b.split == "train"
    dynamic = replace(data, binarize="dynamic")
    first = torch.cat([b.x for b in batches(dynamic, 10, torch.Generator().manual_seed(0))])
    second = torch.cat([b.x for b in batches(dynamic, 10, torch.Generator().manual_seed(1))])
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)


def test_each_split_carries_its_own_side_inputs():
    """The test rows' labels go with the test batch, never the training rows' of the same positions."""
    data = load_dataset("digits", binarize="static", labels_as="y")
    test = data.batch("test", slice(0, 50))
    assert torch.equal(test.inputs["y"], data.test_labels[:50])
    assert not torch.equal(test.inputs["y"], data.train_labels[:50])
    assert data.source["labels_as"] == "y"
    with pytest.raises(ValueError, match="one row per datapoint"):
        Dataset.from_tensors(torch.zeros(5, 2), inputs={"y": torch.zeros(4)})


def test_frey_faces_from_a_mat_file(tmp_path):
    from scipy.io import savemat

    ff = np.random.default_rng(0).integers(0, 256, (560, 50)).astype(np.uint8)
    savemat(tmp_path / "frey_rawface.mat", {"ff": ff})
    data = load_dataset("frey", data_dir=str(tmp_path), val_size=4)
    assert data.image_shape == (1, 28, 20)
    assert data.train.shape[0] + data.val.shape[0] + data.test.shape[0] == 50
    all_x = torch.cat([data.train, data.val, data.test])
    images = torch.as_tensor(ff.T, dtype=torch.float32) / 255  # one face per row
    assert_close(all_x.sum(1).sort().values, images.sum(1).sort().values, atol=1e-4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="frey_rawface.mat"):
        load_dataset("frey", data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="data_dir .*nowhere: no such folder"):
        load_dataset("frey", data_dir=str(tmp_path / "nowhere"))
