"""Bring your own loss, metrics and training step; FedProx built on the training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import meshfl
from meshfl.config import ConfigError, DataConfig, TrainConfig
from meshfl.data import load_dataset
from meshfl.learn.learner import TorchLearner, batch_indices
from meshfl.learn.models import ModelError, build_model

TESTS = Path(__file__).parent
SMALL = {"peers": 4, "rounds": 3, "train": {"local_epochs": 1}}


@pytest.fixture(autouse=True)
def _user_code_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(), 0)


def _learner(digits, **train) -> TorchLearner:
    data, _ = digits
    return TorchLearner(TrainConfig(**train), data.feature_shape, data.num_classes)


def _train(learner: TorchLearner, data, steps: int = 60):
    params = learner.init_params(3)
    return params, learner.train(params, data, torch.Generator().manual_seed(5), steps)


def test_default_loop_is_the_plain_torch_loop_bit_for_bit(digits):
    data, _ = digits
    learner = _learner(digits)
    given, result = _train(learner, data)
    # the reference: a fresh module, the same batches, F.cross_entropy and SGD, written out
    module = build_model("mlp", data.feature_shape, data.num_classes)
    given.to_module(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.0)
    for idx in batch_indices(len(data), 60, 32, torch.Generator().manual_seed(5)):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(data.x[idx]), data.y[idx]).backward()
        optimizer.step()
    reference = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    assert torch.equal(result.params.flat, reference)


@pytest.mark.parametrize("train", [{"fedprox_mu": 0.0}, {"step": "meshfl.learn.steps:sgd_step"},
                                   {"loss": "user_models_for_tests:plain_cross_entropy"}])
def test_same_batches_and_bit_identical_results_as_the_default_loop(digits, train):
    data, _ = digits
    _, default = _train(_learner(digits), data)
    _, other = _train(_learner(digits, **train), data)
    assert torch.equal(default.params.flat, other.params.flat)
    assert (other.samples, other.steps) == (default.samples, default.steps)
    assert other.loss == pytest.approx(default.loss, rel=1e-6)


def test_fedprox_keeps_the_model_closer_to_the_one_given(digits):
    data, _ = digits
    distances = {}
    for mu in (0.0, 1.0):
        given, result = _train(_learner(digits, fedprox_mu=mu), data, steps=120)
        distances[mu] = float((result.params.flat - given.flat).norm())
    assert distances[1.0] < 0.6 * distances[0.0], distances


def test_fedprox_on_a_dirichlet_split_learns_and_is_deterministic(tmp_path):
    config = {"peers": 8, "rounds": 5, "data": {"partition": "dirichlet", "dirichlet_alpha": 0.1},
              "train": {"local_epochs": 2, "fedprox_mu": 0.1}}
    first = meshfl.run(config, out=False, progress=False, report=False)
    second = meshfl.run(config, out=False, progress=False, report=False)
    assert first.summary["mean_final_accuracy"] > 0.3  # chance is 0.1
    for peer, params in first.final_models.items():
        assert params.equal(second.final_models[peer])


def test_user_loss_and_metrics_from_yaml_are_logged_each_round(tmp_path):
    config = {**SMALL, "train": {"local_epochs": 1, "loss": "user_models_for_tests:smoothed_loss",
                                 "metrics": ["user_models_for_tests:macro_f1"]}}
    result = meshfl.run(config, out=tmp_path / "run", progress=False, report=False)
    frame = result.metrics
    f1 = frame[frame.metric == "global_metric_macro_f1"]
    assert len(f1) == 4 * 3 and set(f1["round"]) == {1, 2, 3}
    assert (f1[f1["round"] == 3].value > 0.5).all() and f1[f1["round"] == 1].value.max() < f1.value.max()
    assert len(frame[frame.metric == "local_metric_macro_f1"]) == 4 * 3
    assert result.summary["mean_final_accuracy"] > 0.5
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert "user_models_for_tests:smoothed_loss" in written and "macro_f1: user_models_for_tests:macro_f1" in written
    again = meshfl.run(config, out=False, progress=False, report=False)
    assert all(p.equal(again.final_models[i]) for i, p in result.final_models.items())


def test_python_objects_for_loss_metrics_and_step(tmp_path):
    def top2(logits, labels):
        return float((logits.topk(2, dim=1).indices == labels[:, None]).any(1).float().mean())

    from user_models_for_tests import adam_prox_step, smoothed_loss

    kwargs = dict(out=False, progress=False, report=False, loss=smoothed_loss, metrics={"top2": top2},
                  train_step=adam_prox_step)
    first = meshfl.run(SMALL, **kwargs)
    second = meshfl.run(SMALL, **kwargs)
    assert first.config.train.step == "user_models_for_tests:adam_prox_step"
    assert first.config.train.metrics == {"top2": "python:top2"}
    assert first.summary["mean_final_accuracy"] > 0.7
    top = first.metrics[first.metrics.metric == "global_metric_top2"]
    assert len(top) == 12 and (top[top["round"] == 3].value >= 0.8).all()
    for peer, params in first.final_models.items():  # the step's torch.randn is seeded from the peer's stream
        assert params.equal(second.final_models[peer])
    train_loss = first.metrics[first.metrics.metric == "train_loss"]
    assert train_loss.empty or train_loss.value.notna().all()


def test_errors_name_the_field():
    with pytest.raises(ModelError, match=r"^train\.loss: module 'user_models_for_tests' has no attribute 'nope'"):
        meshfl.run({**SMALL, "train": {"loss": "user_models_for_tests:nope"}}, out=False, progress=False)
    with pytest.raises(ModelError, match=r"^train\.metrics\.f1: module 'no_such_module_xyz' does not import"):
        meshfl.run({**SMALL, "train": {"metrics": {"f1": "no_such_module_xyz:f1"}}}, out=False, progress=False)
    with pytest.raises(ConfigError, match="fedprox_mu"):
        meshfl.run({**SMALL, "train": {"step": "meshfl.learn.steps:sgd_step", "fedprox_mu": 0.1}}, out=False)
    with pytest.raises(ConfigError, match="train.loss"):
        meshfl.run({**SMALL, "train": {"loss": "not a reference"}}, out=False)


def test_launch_refuses_functions_only_this_process_holds(tmp_path):
    from meshfl.experiment.launch import _user_model_env

    config = meshfl.api.resolve_config(SMALL, metrics={"f": lambda logits, labels: 0.0})
    with pytest.raises(ConfigError, match=r"^train\.metrics\.f: 'python:f'"):
        _user_model_env(config.train)
    assert "PYTHONPATH" in _user_model_env(meshfl.api.resolve_config(SMALL, loss="user_models_for_tests:smoothed_loss").train)
    assert json.dumps(_user_model_env(meshfl.api.resolve_config(SMALL).train)) == "{}"


@pytest.mark.parametrize("behaviour", ["label_flip", "sign_flip"])
def test_byzantine_peers_still_lie_with_fedprox(behaviour):
    fault = {"kind": "byzantine", "behaviour": behaviour, "count": 1, "at_s": 0}
    config = {**SMALL, "train": {"local_epochs": 1, "fedprox_mu": 0.1}, "faults": [fault]}
    lying = meshfl.run(config, out=False, progress=False, report=False)
    honest = meshfl.run({**config, "faults": []}, out=False, progress=False, report=False)
    assert lying.summary["byzantine_peers"] and lying.summary["byzantine_peers"] != []
    assert any(not p.equal(honest.final_models[i]) for i, p in lying.final_models.items())
