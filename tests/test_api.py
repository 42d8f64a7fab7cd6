"""Bring your own model and data: the Python API, user models, saved final models, export."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import meshfl
from meshfl.cli import app
from meshfl.config import ConfigError
from meshfl.data import load_dataset
from meshfl.learn.models import ModelError
from meshfl.learn.saved import SavedModelError

TESTS = Path(__file__).parent
SMALL = {"peers": 4, "rounds": 3, "train": {"local_epochs": 1}}


@pytest.fixture(autouse=True)
def _user_code_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # where the user's `user_models_for_tests` module lives


def _accuracy(module: torch.nn.Module, data) -> float:
    with torch.no_grad():
        return int((module(data.x).argmax(1) == data.y).sum()) / len(data)


def test_yaml_factory_with_batch_norm_is_deterministic_and_its_saved_models_predict_as_the_peers(tmp_path):
    config = {**SMALL, "train": {"local_epochs": 1, "model": "user_models_for_tests:bn_net", "model_options": {"width": 6}}}
    first = meshfl.run(config, out=tmp_path / "a", progress=False, report=False)
    second = meshfl.run(config, out=tmp_path / "b", progress=False, report=False)
    assert first.summary["mean_final_accuracy"] > 0.8
    assert sorted(first.final_models) == [0, 1, 2, 3]
    for peer, params in first.final_models.items():  # bit-identical, batch norm statistics included
        assert params.equal(second.final_models[peer])
    names = first.final_models[0].layout.names
    assert "features.1.running_mean" in names and "features.1.running_var" in names
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("global_accuracy") == \
        (tmp_path / "b" / "metrics.jsonl").read_text().count("global_accuracy")

    from user_models_for_tests import BatchNormNet

    _, test = load_dataset(first.config.data, first.config.seed)
    for peer in range(4):
        loaded = meshfl.load_model(first.run_dir, peer, BatchNormNet((1, 8, 8), 10, width=6))
        assert _accuracy(loaded, test) == first.summary["final_global_accuracy"][str(peer)]  # the peer's own evaluation
        reference = first.model(peer)
        assert torch.equal(loaded(test.x), reference(test.x))
    record = json.loads((tmp_path / "a" / "models" / "peer-2.json").read_text())
    assert record["peer"] == 2 and record["round"] == 3 and record["seed"] == 0 and record["algorithm"] == "gossip"
    assert record["runtime"] == "sim" and record["layout"]["fingerprint"] == first.final_models[2].layout.fingerprint
    assert len(record["config_hash"]) == 16
    rebuilt = meshfl.load_model(first.run_dir, 1)  # the run's own train.model, built from its config
    assert torch.equal(rebuilt(test.x), first.model(1)(test.x))


def test_a_module_that_does_not_fit_is_refused_naming_the_difference(tmp_path):
    result = meshfl.run({**SMALL, "rounds": 1}, out=tmp_path / "run", progress=False, report=False)
    from user_models_for_tests import BatchNormNet

    with pytest.raises(SavedModelError, match=r"does not fit this module .*tensor 0 is 1.weight \[256, 64\] saved, features.0.weight"):
        meshfl.load_model(result.run_dir, 0, BatchNormNet())
    with pytest.raises(SavedModelError, match=r"no final model of peer 9 \(saved peers: 0, 1, 2, 3\)"):
        meshfl.load_model(result.run_dir, 9)


@pytest.mark.parametrize(("model", "message"), [
    ("no_such_module_xyz:make", "train.model: module 'no_such_module_xyz' does not import (ModuleNotFoundError"),
    ("user_models_for_tests:missing", "train.model: module 'user_models_for_tests' has no attribute 'missing'"),
    ("user_models_for_tests:NOT_CALLABLE", "train.model: 'user_models_for_tests:NOT_CALLABLE' is not callable (it is a int)"),
    ("user_models_for_tests:not_a_module", "train.model: 'user_models_for_tests:not_a_module' returned a list, not a torch.nn.Module"),
    ("not a reference", "train.model: must be mlp, cnn or lenet5 or a factory `package.module:factory`"),
])
def test_model_errors_name_the_field(tmp_path, model, message):
    with pytest.raises((ModelError, ConfigError)) as info:
        meshfl.run({**SMALL, "train.model": model}, out=False, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_run_reports_a_model_error_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(TESTS)  # `meshfl run` imports user modules from the current folder
    ok = CliRunner().invoke(app, ["run", "-q", "--set", "peers=2", "--set", "rounds=1", "--set", "train.local_steps=2",
                                  "--set", "train.model=user_models_for_tests:tiny_mlp", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["run", "-q", "--set", "train.model=user_models_for_tests:missing", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "train.model: module 'user_models_for_tests' has no attribute 'missing'" in bad.output
    assert not (tmp_path / "bad").exists()


def test_export_writes_the_peers_model_and_record(tmp_path):
    result = meshfl.run({**SMALL, "rounds": 1}, out=tmp_path / "run", progress=False, report=False)
    out = tmp_path / "exported" / "peer3.safetensors"
    done = CliRunner().invoke(app, ["export", str(result.run_dir), "--peer", "3", "-o", str(out)])
    assert done.exit_code == 0, done.output
    from safetensors.torch import load_file

    module = result.model(3)
    fresh = meshfl.load_model(result.run_dir, 0)  # another peer's model, then peer 3's exported tensors over it
    fresh.load_state_dict(load_file(str(out)))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), module.state_dict().values(), strict=True))
    assert json.loads(out.with_suffix(".json").read_text())["peer"] == 3
    missing = CliRunner().invoke(app, ["export", str(result.run_dir), "--peer", "7", "-o", str(out)])
    assert missing.exit_code == 2 and "no final model of peer 7" in missing.output


def test_factory_object_and_dataframe_run_in_the_simulator_but_not_in_peer_processes(tmp_path):
    import pandas as pd

    def local_factory(feature_shape, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(feature_shape[0], num_classes))

    frame = pd.DataFrame({"a": [0.0, 1.0] * 100, "b": [1.0, 0.0] * 100, "kind": ["x", "y"] * 100})
    config = {**SMALL, "rounds": 2, "data": {"label_column": "kind"}, "train": {"local_steps": 30, "learning_rate": 0.5}}
    result = meshfl.run(config, model=local_factory, dataset=frame, out=False, progress=False)
    assert result.run_dir is None and result.summary["mean_final_accuracy"] == 1.0
    assert result.config.train.model.startswith("python:") and result.config.train.model.endswith(".local_factory")
    assert set(result.metrics["metric"]) >= {"global_accuracy", "local_accuracy"}
    assert result.metrics[result.metrics.metric == "global_accuracy"]["round"].max() == 2
    with pytest.raises(ConfigError, match=r"train.model: .* lives only in this Python process"):
        meshfl.launch(config, model=local_factory, out=tmp_path / "grpc", progress=False)
    with pytest.raises(ValueError, match="data.label_column: 'label' is not a column of the DataFrame"):
        meshfl.run(SMALL, dataset=frame, out=False, progress=False)


def test_custom_model_example_learns_digits_from_a_dataframe(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["custom_model.py", "--peers", "8", "--rounds", "3", "--quiet", "--out", str(tmp_path / "run")])
    namespace = runpy.run_path(str(TESTS.parent / "examples" / "custom_model.py"), run_name="__main__")
    assert "main" in namespace
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peers"] == 8 and summary["min_final_accuracy"] > 0.75
    assert len(list((tmp_path / "run" / "models").glob("peer-*.safetensors"))) == 8


def test_launch_builds_the_user_model_in_every_peer_process_and_collects_their_final_models(tmp_path):
    config = {"peers": 3, "rounds": 2, "train": {"local_epochs": 1, "model": "user_models_for_tests:bn_net"}}
    result = meshfl.launch(config, out=tmp_path / "grpc", progress=False, report=False, timeout_s=240)
    assert result.summary["dead_peers"] == [] and sorted(result.final_models) == [0, 1, 2]
    _, test = load_dataset(result.config.data, result.config.seed)
    for peer in range(3):
        record = json.loads((tmp_path / "grpc" / "models" / f"peer-{peer}.json").read_text())
        assert record["runtime"] == "grpc" and record["peer"] == peer and record["round"] == 2
        loaded = meshfl.load_model(result.run_dir, peer)
        assert _accuracy(loaded, test) == result.summary["final_global_accuracy"][str(peer)]
    assert result.summary["mean_final_accuracy"] > 0.7
