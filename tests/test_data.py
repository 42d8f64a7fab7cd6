"""Loaders: digits, numpy, csv/parquet, MNIST (IDX parsing, location, download, errors)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pandas as pd
import pytest
import torch

from meshfl.config import DataConfig
from meshfl.data import DataError, Dataset, load_dataset, mnist

# $MESHFL_DATA (the README's test command sets ../shared/data), else ../shared/data beside the repository
SHARED_MNIST = (Path(os.environ.get("MESHFL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
                .expanduser().resolve() / "mnist")
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
needs_mnist = pytest.mark.skipif(
    not all((SHARED_MNIST / name).is_file() for name in mnist.FILES), reason=f"MNIST files absent from {SHARED_MNIST} (set MESHFL_DATA)")


# ---------------------------------------------------------------- Dataset


def test_dataset_coerces_and_subsets() -> None:
    ds = Dataset(torch.arange(12, dtype=torch.float64).reshape(6, 2), torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32), 3, "t")
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert len(ds) == 6 and ds.feature_shape == (2,)
    sub = ds.subset(np.array([4, 1]))
    assert sub.y.tolist() == [1, 1] and sub.x[:, 0].tolist() == [8.0, 2.0] and sub.num_classes == 3
    assert len(ds.subset(torch.tensor([5]))) == 1
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0


def test_dataset_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        Dataset(torch.zeros(2, 1), torch.tensor([0, 3]), 3, "t")
    with pytest.raises(ValueError, match="disagree"):
        Dataset(torch.zeros(3, 1), torch.tensor([0, 1]), 3, "t")


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_stratified_split() -> None:
    train, test = load_dataset(DataConfig(dataset="digits", test_fraction=0.25), seed=0)
    assert train.x.shape[1:] == (1, 8, 8) and test.feature_shape == (1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64 and train.x.is_contiguous()
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.25 * 1797) <= 10
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert train.num_classes == test.num_classes == 10
    fractions = np.bincount(test.y.numpy(), minlength=10) / (
        np.bincount(test.y.numpy(), minlength=10) + np.bincount(train.y.numpy(), minlength=10))
    assert np.all(np.abs(fractions - 0.25) < 0.02)


def test_digits_split_is_deterministic_per_seed() -> None:
    a, _ = load_dataset(DataConfig(dataset="digits"), seed=3)
    b, _ = load_dataset(DataConfig(dataset="digits"), seed=3)
    c, _ = load_dataset(DataConfig(dataset="digits"), seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


# ---------------------------------------------------------------- numpy


def test_npz_round_trip_with_held_out_test(tmp_path: Path) -> None:
    x = np.arange(100, dtype=np.float64).reshape(50, 2)
    y = np.arange(50) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    train, test = load_dataset(DataConfig(dataset="numpy", path=str(tmp_path / "d.npz"), test_fraction=0.2), seed=0)
    assert len(train) == 40 and len(test) == 10 and train.num_classes == 5
    rows = torch.cat([train.x, test.x])[:, 0].numpy().astype(int) // 2
    assert sorted(rows.tolist()) == list(range(50))  # every row exactly once across the split
    assert np.array_equal(torch.cat([train.y, test.y]).numpy(), y[rows])


def test_npz_with_explicit_test_split(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((6, 3, 4), np.uint8), y=np.array([0, 1, 0, 1, 0, 1]),
             x_test=np.zeros((2, 3, 4)), y_test=np.array([2, 0]))
    train, test = load_dataset(DataConfig(dataset="numpy", path=str(tmp_path / "d.npz")), seed=0)
    assert train.feature_shape == (3, 4) and len(train) == 6 and len(test) == 2
    assert train.num_classes == test.num_classes == 3 and test.y.tolist() == [2, 0]


def test_npz_never_unpickles(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.array([object(), object()], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="pickled"):
        load_dataset(DataConfig(dataset="numpy", path=str(tmp_path / "d.npz")), seed=0)


def test_npz_missing_arrays_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", features=np.zeros((3, 2)), y=np.zeros(3, int))
    with pytest.raises(DataError, match="'x' and 'y'.*features"):
        load_dataset(DataConfig(dataset="numpy", path=str(tmp_path / "d.npz")), seed=0)


@pytest.mark.parametrize("kind", ["numpy", "csv", "parquet"])
def test_path_required_and_must_exist(kind: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^data.path: required for dataset={kind}"):
        load_dataset(DataConfig(dataset=kind), seed=0)
    missing = tmp_path / "nope.bin"
    with pytest.raises(DataError, match="nope.bin") as info:
        load_dataset(DataConfig(dataset=kind, path=str(missing)), seed=0)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- csv / parquet


def _table(n: int = 60) -> pd.DataFrame:
    names = np.array(["dog", "cat", "bird"])
    code = np.arange(n) % 3  # alphabetical: bird=0, cat=1, dog=2
    return pd.DataFrame({"f1": np.arange(n, dtype=float), "label": names[[2, 1, 0]][code], "f2": code * 10})


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_round_trip_with_string_labels(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"t.{kind}"
    frame = _table()
    frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path)
    train, test = load_dataset(DataConfig(dataset=kind, path=str(path), test_fraction=0.2), seed=1)
    assert train.num_classes == 3 and train.feature_shape == (2,)
    assert len(train) == 48 and len(test) == 12
    both_x, both_y = torch.cat([train.x, test.x]), torch.cat([train.y, test.y])
    assert sorted(both_x[:, 0].tolist()) == list(range(60))
    expected = {"bird": 0, "cat": 1, "dog": 2}
    for row, label in zip(both_x.tolist(), both_y.tolist()):
        assert expected[frame["label"].iloc[int(row[0])]] == label
        assert row[1] == 10 * label


def test_csv_sparse_int_labels_map_to_range(tmp_path: Path) -> None:
    pd.DataFrame({"a": range(30), "cls": [3, 70, 100] * 10}).to_csv(tmp_path / "t.csv", index=False)
    train, test = load_dataset(DataConfig(dataset="csv", path=str(tmp_path / "t.csv"), label_column="cls"), seed=0)
    assert train.num_classes == 3 and set(train.y.tolist()) == {0, 1, 2}


def test_csv_non_numeric_column_named(tmp_path: Path) -> None:
    frame = _table()
    frame["colour"] = "red"
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="'colour'") as info:
        load_dataset(DataConfig(dataset="csv", path=str(tmp_path / "t.csv")), seed=0)
    assert "\n" not in str(info.value)


def test_csv_missing_label_column_named(tmp_path: Path) -> None:
    _table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="^data.label_column: 'target'"):
        load_dataset(DataConfig(dataset="csv", path=str(tmp_path / "t.csv"), label_column="target"), seed=0)


# ---------------------------------------------------------------- MNIST: synthetic IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (directory / name).write_bytes(gzip.compress(data))
        else:
            (directory / name.removesuffix(".gz")).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_gzipped_and_plain_idx(tmp_path: Path, gz: bool) -> None:
    _write_mnist(tmp_path, gz=gz)
    train, test = load_dataset(DataConfig(dataset="mnist", path=str(tmp_path), download=False), seed=0)
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (10, 1, 28, 28)
    assert train.y.tolist() == [i % 10 for i in range(30)] and train.num_classes == 10
    assert float(train.x.min()) >= (0 - mnist.MEAN) / mnist.STD - 1e-6
    assert float(train.x.max()) <= (1 - mnist.MEAN) / mnist.STD + 1e-6


def _corrupt_bad_magic(path: Path) -> None:
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[3] = 0x07
    path.write_bytes(gzip.compress(bytes(data)))


def _corrupt_truncate(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))


def _corrupt_not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not gzip data")


@pytest.mark.parametrize("corrupt", [_corrupt_bad_magic, _corrupt_truncate, _corrupt_not_gzip])
@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_mnist_corrupt_file_named(tmp_path: Path, corrupt, name: str) -> None:
    _write_mnist(tmp_path)
    corrupt(tmp_path / name)
    with pytest.raises(DataError, match=name) as info:
        load_dataset(DataConfig(dataset="mnist", path=str(tmp_path), download=False), seed=0)
    assert "\n" not in str(info.value)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(29))))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: 29 labels for 30 images"):
        load_dataset(DataConfig(dataset="mnist", path=str(tmp_path), download=False), seed=0)


def test_mnist_directory_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHFL_DATA", raising=False)
    monkeypatch.setenv("MESHFL_CACHE", str(tmp_path / "cache"))
    assert mnist.mnist_dir(DataConfig(dataset="mnist")) == tmp_path / "cache" / "mnist"
    monkeypatch.setenv("MESHFL_DATA", str(tmp_path / "data"))
    assert mnist.mnist_dir(DataConfig(dataset="mnist")) == tmp_path / "data" / "mnist"
    assert mnist.mnist_dir(DataConfig(dataset="mnist", path=str(tmp_path / "p"))) == tmp_path / "p"


# ---------------------------------------------------------------- MNIST: missing files and downloads


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No MESHFL_DATA, cache under tmp_path: where the loader must look and download."""
    monkeypatch.delenv("MESHFL_DATA", raising=False)
    monkeypatch.setenv("MESHFL_CACHE", str(tmp_path))
    return tmp_path / "mnist"


def _serve(files: dict[str, bytes], calls: list[str], offline_prefix: str | None = None):
    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        calls.append(url)
        if offline_prefix is not None and url.startswith(offline_prefix):
            raise URLError("no route to host")
        return io.BytesIO(files[url.rsplit("/", 1)[1]])
    return fake_urlopen


def test_mnist_offline_missing_is_one_line_naming_meshfl_data(cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(mnist, "urlopen", _serve({}, calls, offline_prefix="https://"))
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="mnist"), seed=0)
    message = str(info.value)
    assert "MESHFL_DATA" in message and "data.path" in message and "\n" not in message
    assert calls == [m + "train-images-idx3-ubyte.gz" for m in mnist.MIRRORS]  # every mirror tried, in order
    assert not cache_env.exists() or not any(cache_env.iterdir())


def test_mnist_missing_without_download_never_touches_network(cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(mnist, "urlopen", _serve({}, calls))
    with pytest.raises(DataError, match="data.download is false.*MESHFL_DATA") as info:
        load_dataset(DataConfig(dataset="mnist", download=False), seed=0)
    assert calls == [] and "\n" not in str(info.value)


def test_mnist_download_verifies_gzip_md5(cache_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small synthetic files whose gzip md5 is registered: accepted, written, then parsed."""
    source = tmp_path / "source"
    _write_mnist(source)
    files = {name: (source / name).read_bytes() for name in mnist.FILES}
    monkeypatch.setattr(mnist, "FILES", {n: (hashlib.md5(b).hexdigest(), "0" * 32) for n, b in files.items()})
    calls: list[str] = []
    monkeypatch.setattr(mnist, "urlopen", _serve(files, calls))
    train, test = load_dataset(DataConfig(dataset="mnist"), seed=0)
    assert len(train) == 30 and len(test) == 10
    assert sorted(p.name for p in cache_env.iterdir()) == sorted(files)
    assert all((cache_env / n).read_bytes() == b for n, b in files.items())
    assert calls == [mnist.MIRRORS[0] + n for n in files]


def test_mnist_download_wrong_md5_rejected_and_leaves_nothing(cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = {name: gzip.compress(_idx_bytes(np.zeros((2, 28, 28)))) for name in mnist.FILES}
    calls: list[str] = []
    monkeypatch.setattr(mnist, "urlopen", _serve(tampered, calls))
    with pytest.raises(DataError, match="md5 mismatch") as info:
        load_dataset(DataConfig(dataset="mnist"), seed=0)
    assert "\n" not in str(info.value) and len(calls) == len(mnist.MIRRORS)
    assert not cache_env.exists() or not any(cache_env.iterdir())


@needs_mnist
def test_mnist_download_from_second_mirror_with_real_files(cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared copies are re-gzipped, so they pass through the uncompressed-md5 check."""
    files = {name: (SHARED_MNIST / name).read_bytes() for name in mnist.FILES}
    calls: list[str] = []
    monkeypatch.setattr(mnist, "urlopen", _serve(files, calls, offline_prefix=mnist.MIRRORS[0]))
    train, test = load_dataset(DataConfig(dataset="mnist"), seed=0)
    assert len(train) == 60000 and len(test) == 10000
    assert sorted(p.name for p in cache_env.iterdir()) == sorted(mnist.FILES)  # no temp files left
    assert calls[:2] == [m + "train-images-idx3-ubyte.gz" for m in mnist.MIRRORS]


# ---------------------------------------------------------------- MNIST: the real files


@needs_mnist
def test_mnist_shared_files_shapes_and_class_counts() -> None:
    train, test = load_dataset(DataConfig(dataset="mnist", path=str(SHARED_MNIST), download=False), seed=0)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert np.bincount(train.y.numpy(), minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1.0) < 0.01


@needs_mnist
def test_mnist_in_process_cache_returns_independent_tensors() -> None:
    config = DataConfig(dataset="mnist", path=str(SHARED_MNIST), download=False)
    first, _ = load_dataset(config, seed=0)
    before = first.x[0].clone()
    first.x[0] += 1.0  # mutating one load must not leak into the next
    second, _ = load_dataset(config, seed=0)
    assert torch.equal(second.x[0], before)
    assert mnist._parse_all.cache_info().hits >= 1
