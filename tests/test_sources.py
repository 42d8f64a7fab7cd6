"""More data sources (issue 14): JSON/JSON Lines files, SQL databases, Hugging Face datasets, torch Datasets.

Every source is sklearn's digits in another form, so each test can check the outcome: the right
number of samples and classes, a Dirichlet partition that hands every sample to some peer, and a
4-peer, 2-round simulator run that learns (chance is 0.1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import meshfl
from meshfl.config import DataConfig
from meshfl.data import DataError, load_dataset, partition_stats, split_for_peers
from meshfl.data.frame import register_dataset

N, CLASSES = 1797, 10
RUN = {"peers": 4, "rounds": 2, "train": {"local_steps": 30, "learning_rate": 0.3}}
DIRICHLET = {"partition": "dirichlet", "dirichlet_alpha": 1.0}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _frame() -> pd.DataFrame:
    x, y = _digits()
    frame = pd.DataFrame(x, columns=[f"p{i}" for i in range(x.shape[1])])
    frame["digit"] = [f"d{v}" for v in y]  # string labels, numbered 0..9 by sorted value
    return frame


def _hf_dataset(n: int | None = None):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    x, y = _digits()
    x, y = x[:n], y[:n]
    images = [Image.fromarray(np.round(img.reshape(8, 8) * 255).astype(np.uint8), mode="L") for img in x]
    features = datasets.Features({"image": datasets.Image(),
                                  "digit": datasets.ClassLabel(names=[str(i) for i in range(CLASSES)])})
    return datasets.Dataset.from_dict({"image": images, "digit": y.tolist()}, features=features)


def _check_loads_partitions_and_learns(data: dict, dataset=None, samples: int = N, classes: int = CLASSES,
                                       shape: tuple[int, ...] = (64,), min_accuracy: float = 0.5) -> None:
    config = DataConfig(**data, **DIRICHLET)
    if dataset is not None:
        kind, key = register_dataset(dataset)
        config = config.model_copy(update={"dataset": kind, "path": key})
    train, test = load_dataset(config, seed=0)
    assert len(train) + len(test) == samples
    assert train.num_classes == classes and len(set(test.y.tolist())) == classes
    assert train.feature_shape == shape and test.feature_shape == shape
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    peers = split_for_peers(train, 4, config, seed=0)
    stats = partition_stats(peers, train.num_classes)
    counts = np.sum([np.add(s["train_label_counts"], s["test_label_counts"]) for s in stats], axis=0)
    assert counts.tolist() == np.bincount(train.y.numpy(), minlength=classes).tolist()  # every sample to one peer
    assert all(s["train_samples"] > 0 for s in stats)
    assert len({tuple(s["train_label_counts"]) for s in stats}) == 4  # label skew: no two peers alike
    result = meshfl.run({**RUN, "data": {**data, **DIRICHLET}}, dataset=dataset, out=False, progress=False, report=False)
    assert result.config.data.dataset == config.dataset
    assert result.summary["mean_final_accuracy"] > min_accuracy, result.summary


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_json_files(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"digits.{kind}"
    _frame().to_json(path, orient="records", lines=kind == "jsonl")
    if kind == "json":
        assert path.read_text().startswith("[{")
    _check_loads_partitions_and_learns({"dataset": kind, "path": str(path), "label_column": "digit"})


def test_json_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1, "label": 0}\n{"a": "x", "label": 1}\n')
    with pytest.raises(DataError, match=r"data.path: column 'a' .* is not numeric"):
        load_dataset(DataConfig(dataset="jsonl", path=str(path)), 0)
    with pytest.raises(DataError, match=r"data.label_column: 'digit' is not a column"):
        load_dataset(DataConfig(dataset="jsonl", path=str(path), label_column="digit"), 0)
    path.write_text("not json")
    with pytest.raises(DataError, match=r"data.path: cannot read .* as jsonl"):
        load_dataset(DataConfig(dataset="jsonl", path=str(path)), 0)
    with pytest.raises(DataError, match=r"data.path: file .* does not exist"):
        load_dataset(DataConfig(dataset="json", path=str(tmp_path / "missing.json")), 0)


@pytest.fixture
def digits_db(tmp_path: Path) -> str:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    url = f"sqlite:///{tmp_path / 'digits.db'}"  # sqlite:////abs/path
    engine = sqlalchemy.create_engine(url)
    _frame().to_sql("digits", engine, index=False)
    engine.dispose()
    return url


def test_sql_table(digits_db: str) -> None:
    assert digits_db.startswith("sqlite:////")
    _check_loads_partitions_and_learns({"dataset": "sql", "path": digits_db, "query": "digits", "label_column": "digit"})


def test_sql_select(digits_db: str) -> None:
    query = "SELECT * FROM digits WHERE digit IN ('d0', 'd1', 'd2', 'd3', 'd4')"
    _, y = _digits()
    _check_loads_partitions_and_learns({"dataset": "sql", "path": digits_db, "query": query, "label_column": "digit"},
                                       samples=int((y < 5).sum()), classes=5, min_accuracy=0.6)


def test_sql_errors_name_the_field(digits_db: str, tmp_path: Path) -> None:
    def load(**fields):
        return load_dataset(DataConfig(dataset="sql", label_column="digit", **fields), 0)

    with pytest.raises(DataError, match=r"^data.query: required"):
        load(path=digits_db)
    with pytest.raises(DataError, match=r"^data.path: required"):
        load(query="digits")
    with pytest.raises(DataError, match=r"^data.query: must be a table name or a SELECT"):
        load(path=digits_db, query="DELETE FROM digits")
    with pytest.raises(DataError, match=r"^data.query: .*nope"):
        load(path=digits_db, query="nope")
    with pytest.raises(DataError, match=r"^data.query: cannot read data.query"):
        load(path=digits_db, query="SELECT * FROM nope")
    with pytest.raises(DataError, match=r"^data.query: data.query .* returned no rows"):
        load(path=digits_db, query="SELECT * FROM digits WHERE 0")
    with pytest.raises(DataError, match=r"^data.path: .* names no existing SQLite file"):
        load(path=f"sqlite:///{tmp_path / 'missing.db'}", query="digits")
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(DataError, match=r"^data.path: not a SQLAlchemy URL"):
        load(path="no url here", query="digits")
    with pytest.raises(DataError, match=r"^data.path: cannot use postgresql\+nosuchdriver://u:\*\*\*@h/db") as error:
        load(path="postgresql+nosuchdriver://u:secret@h/db", query="digits")
    assert "secret" not in str(error.value)
    assert load(path=digits_db, query="digits")[0].num_classes == CLASSES  # the database was left as it was


def test_missing_optional_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # import sqlalchemy raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"^data.dataset=sql needs the optional package sqlalchemy: pip install 'meshfl\[data\]'$"):
        load_dataset(DataConfig(dataset="sql", path="sqlite:////x.db", query="t"), 0)
    with pytest.raises(DataError, match=r"^data.dataset=huggingface needs .* pip install 'meshfl\[data\]'$"):
        load_dataset(DataConfig(dataset="huggingface", path="/nowhere"), 0)


def test_huggingface_dataset_object_with_images_shaped_for_a_cnn() -> None:
    ds = _hf_dataset()
    _check_loads_partitions_and_learns({"label_column": "digit", "feature_shape": [1, 8, 8]}, dataset=ds, shape=(1, 8, 8))
    assert register_dataset(_hf_dataset()) == register_dataset(ds)  # same content, same config
    assert register_dataset(ds.select(range(10)))[1] != register_dataset(ds)[1]


def test_huggingface_folder_flattens_images(tmp_path: Path) -> None:
    _hf_dataset().save_to_disk(tmp_path / "digits")
    _check_loads_partitions_and_learns({"dataset": "huggingface", "path": str(tmp_path / "digits"), "label_column": "digit"})


def test_huggingface_folder_with_a_test_split(tmp_path: Path) -> None:
    import datasets

    splits = _hf_dataset().train_test_split(test_size=300, seed=0, stratify_by_column="digit")
    assert isinstance(splits, datasets.DatasetDict)
    splits.save_to_disk(tmp_path / "digits")
    train, test = load_dataset(DataConfig(dataset="huggingface", path=str(tmp_path / "digits"), label_column="digit"), 0)
    assert (len(train), len(test), train.num_classes) == (N - 300, 300, CLASSES)


def test_huggingface_errors_name_the_field(tmp_path: Path) -> None:
    ds = _hf_dataset(50)
    with pytest.raises(DataError, match=r"^data.label_column: 'label' is not a column of the datasets.Dataset"):
        meshfl.run(RUN, dataset=ds, out=False, progress=False)
    with pytest.raises(DataError, match=r"^data.feature_shape: \[1, 4, 4\] holds 16 values, but .* has 64"):
        meshfl.run({**RUN, "data": {"label_column": "digit", "feature_shape": [1, 4, 4]}}, dataset=ds, out=False, progress=False)
    with pytest.raises(DataError, match=r"^dataset: a DatasetDict holds splits \['test', 'train'\]; pass one"):
        meshfl.run(RUN, dataset=ds.train_test_split(test_size=10), out=False, progress=False)
    with pytest.raises(DataError, match=r"^data.path: folder .* does not exist"):
        load_dataset(DataConfig(dataset="huggingface", path=str(tmp_path / "none")), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^data.path: .* is not a save_to_disk folder"):
        load_dataset(DataConfig(dataset="huggingface", path=str(tmp_path / "empty")), 0)
    with pytest.raises(DataError, match=r"^data.path: .*column 'name' .* is not numeric"):
        load_dataset(DataConfig(dataset="huggingface", path=_save(ds.add_column("name", ["a"] * 50), tmp_path)), 0)


def _save(ds, tmp_path: Path) -> str:
    ds = ds.rename_column("digit", "label")
    ds.save_to_disk(tmp_path / "saved")
    return str(tmp_path / "saved")


class DigitImages(torch.utils.data.Dataset):
    """A map-style torch Dataset yielding ([1, 8, 8] tensor, int label), as torchvision ones do."""

    def __init__(self) -> None:
        self.x, self.y = _digits()
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.from_numpy(self.x[i].reshape(1, 8, 8)), int(self.y[i])


def test_torch_dataset_is_read_once_and_keeps_its_shape() -> None:
    ds = DigitImages()
    _check_loads_partitions_and_learns({}, dataset=ds, shape=(1, 8, 8))
    assert ds.reads == 2 * N  # once per registration (the check registers it, then meshfl.run)
    flat = {**RUN, "data": {"feature_shape": [64]}}
    assert meshfl.run(flat, dataset=ds, out=False, progress=False).summary["mean_final_accuracy"] > 0.5


def test_torch_dataset_errors() -> None:
    with pytest.raises(DataError, match=r"^dataset: item 0 of the torch Dataset must be \(features, label\)"):
        register_dataset(torch.utils.data.TensorDataset(torch.zeros(3, 2)))
    with pytest.raises(DataError, match=r"labels must be class integers"):
        register_dataset(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0.5, 1.0, 0.0])))
    with pytest.raises(DataError, match=r"^data.path: data.dataset=torch without a file is the object passed"):
        load_dataset(DataConfig(dataset="torch", path="python:torch-0000"), 0)
    with pytest.raises(DataError, match=r"^dataset: must be a pandas DataFrame, a datasets.Dataset or a torch"):
        meshfl.run(RUN, dataset=[1, 2, 3], out=False, progress=False)
