"""Models of other frameworks: a PyTorch Lightning module and a Keras 3 model, trained by 4 simulated peers.

Digits (sklearn, 8x8), 4 peers, 8 rounds of one local epoch. Asserted: mean final global
accuracy of the 4 peers >= 0.88 for each; reached when written, seed 0 (seeds 0-2):
Lightning gossip 0.942 (0.914-0.942), Lightning manual optimisation with the coordinator 0.928
(0.916-0.936), Keras gossip 0.955 (0.900-0.955).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_lightning")
os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported (meshfl does it for YAML references)
pytest.importorskip("keras")

import meshfl  # noqa: E402
from meshfl.api import resolve_config  # noqa: E402
from meshfl.config import ConfigError  # noqa: E402
from meshfl.data import load_dataset  # noqa: E402
from meshfl.learn.adapters import KerasLearner, LightningLearner, check_keras_backend, layout_of, load_into, make_learner  # noqa: E402
from meshfl.learn.models import ModelError, build_model  # noqa: E402

TESTS = Path(__file__).parent
LIGHTNING = "framework_models_for_tests:DigitsLightning"
KERAS = "framework_models_for_tests:digits_keras"
FOUR = {"peers": 4, "rounds": 8, "train": {"local_epochs": 1}}


@pytest.fixture(autouse=True)
def _user_code_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(autouse=True)
def _one_thread():
    """Keras's many small ops cost 40x more with two torch threads on two busy cores (108 ms vs 2.4 ms a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(config, **kwargs):
    return meshfl.run(config, progress=False, report=False, **{"out": False, **kwargs})


def _same(first, second) -> bool:
    return sorted(first.final_models) == sorted(second.final_models) and all(
        p.equal(second.final_models[peer]) for peer, p in first.final_models.items())


def test_lightning_module_trains_four_gossip_peers_deterministically(tmp_path):
    config = {**FOUR, "train": {"local_epochs": 1, "model": LIGHTNING}}
    first = _run(config, out=tmp_path / "run")
    assert first.summary["mean_final_accuracy"] >= 0.88  # reached 0.942
    assert sorted(first.final_models) == [0, 1, 2, 3]
    assert _same(first, _run(config))  # bit-identical: batches, dropout and Adam from the seed alone
    assert not _same(first, _run(config, seed=1))
    losses = first.metrics[first.metrics.metric == "global_loss"]["value"]
    assert losses.notna().all() and losses.iloc[-1] < losses.iloc[0]  # the module's own validation_step loss
    # the saved final model loads back into the module, which predicts as the peer evaluated
    from framework_models_for_tests import DigitsLightning

    _, test = load_dataset(first.config.data, first.config.seed)
    module = meshfl.load_model(first.run_dir, 2, DigitsLightning())
    accuracy = int((module(test.x).argmax(1) == test.y).sum()) / len(test)
    assert accuracy == first.summary["final_global_accuracy"]["2"]


def test_manual_optimisation_lightning_module_trains_four_coordinator_peers():
    from framework_models_for_tests import ManualLightning

    result = _run({**FOUR, "algorithm": "coordinator"}, model=ManualLightning)
    assert result.config.train.model == "framework_models_for_tests:ManualLightning"
    assert result.summary["mean_final_accuracy"] >= 0.88  # reached 0.928


def test_keras_model_trains_four_gossip_peers_deterministically(tmp_path):
    config = {**FOUR, "train": {"local_epochs": 1, "model": KERAS}}
    first = _run(config, out=tmp_path / "run")
    assert first.summary["mean_final_accuracy"] >= 0.88  # reached 0.955
    names = first.final_models[0].layout.names
    assert "sequential/dense/kernel" in names and "sequential/batch_normalization/moving_mean" in names
    assert _same(first, _run(config))  # bit-identical, batch-norm statistics and dropout included
    # the run's own factory rebuilds the model; its predictions are the peer's evaluation
    _, test = load_dataset(first.config.data, first.config.seed)
    model = meshfl.load_model(first.run_dir, 1)
    with torch.no_grad():
        predicted = model(test.x, training=False).argmax(1)
    assert int((predicted == test.y).sum()) / len(test) == first.summary["final_global_accuracy"]["1"]


@pytest.mark.parametrize("model", [LIGHTNING, KERAS])
def test_weights_round_trip_exactly_through_params(model):
    config = resolve_config({"train.model": model}).train
    learner = make_learner(config, (1, 8, 8), 10)
    assert isinstance(learner, LightningLearner if model == LIGHTNING else KerasLearner)
    params = learner.init_params(7)
    assert params.equal(learner.init_params(7)) and not params.equal(learner.init_params(8))
    fresh = build_model(model, (1, 8, 8), 10)
    assert layout_of(fresh) == params.layout
    load_into(fresh, params)
    if model == KERAS:
        read = torch.cat([v.value.detach().reshape(-1) for v in fresh.weights if "float" in str(v.dtype)])
    else:
        read = torch.cat([t.detach().reshape(-1) for t in fresh.state_dict().values() if t.is_floating_point()])
    assert torch.equal(read, params.flat)
    data, _ = load_dataset(resolve_config({}).data, 0)
    trained = learner.train(params, data, torch.Generator().manual_seed(3), 4)
    again = learner.train(params, data, torch.Generator().manual_seed(3), 4)
    assert trained.steps == 4 and trained.samples == 4 * config.batch_size
    assert trained.params.equal(again.params) and not trained.params.equal(params)
    assert learner.evaluate(trained.params, data) == learner.evaluate(again.params, data)


def test_wrong_objects_and_fields_name_train_model_or_the_field():
    with pytest.raises(ModelError, match=r"train.model: .*uncompiled_keras.* is not compiled; call model.compile"):
        _run({**FOUR, "train.model": "framework_models_for_tests:uncompiled_keras"})
    with pytest.raises(ModelError, match=r"train.model: .*not_a_module.* returned a list, not a torch.nn.Module \(nor a LightningModule or a Keras model\)"):
        _run({**FOUR, "train.model": "user_models_for_tests:not_a_module"})
    with pytest.raises(ModelError, match=r"train.loss: does not apply to a LightningModule model"):
        _run({**FOUR, "train.model": LIGHTNING, "train.loss": "user_models_for_tests:plain_cross_entropy"})
    with pytest.raises(ModelError, match=r"train.fedprox_mu: does not apply to a Keras model"):
        _run({**FOUR, "train.model": KERAS, "train.fedprox_mu": 0.1})
    from framework_models_for_tests import DigitsLightning, digits_keras

    with pytest.raises(ModelError, match="not an instance"):
        _run(FOUR, model=DigitsLightning())
    with pytest.raises(ModelError, match="not an instance"):
        _run(FOUR, model=digits_keras((1, 8, 8), 10))
    with pytest.raises(ValueError, match=r"compute.batching=on, but .*train.model=framework_models_for_tests:DigitsLightning is a user model"):
        _run({**FOUR, "rounds": 1, "train.model": LIGHTNING, "compute.batching": "on"})


def test_batching_auto_trains_them_one_by_one():
    config = {"peers": 4, "rounds": 1, "train": {"local_steps": 2, "model": LIGHTNING}, "compute": {"batching": "auto"}}
    assert _same(_run(config), _run({**config, "compute": {"batching": "off"}}))


def test_keras_on_another_backend_and_missing_packages_are_one_line(monkeypatch, tmp_path):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ModelError, match=r"train.model: keras was imported with the 'jax' backend; .*set KERAS_BACKEND=torch"):
        check_keras_backend()
    (tmp_path / "needs_lightning.py").write_text("import pytorch_lightning\n\ndef make():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)  # as if not installed
    with pytest.raises((ModelError, ConfigError)) as info:
        _run({**FOUR, "train.model": "needs_lightning:make"})
    assert "needs 'pytorch_lightning', which is not installed: pip install 'meshfl[lightning]'" in str(info.value)
    assert "\n" not in str(info.value)


def test_keras_model_trains_in_peer_processes_with_the_simulators_names(tmp_path):
    config = {"peers": 3, "rounds": 2, "train": {"local_epochs": 1, "model": KERAS}}
    result = meshfl.launch(config, out=tmp_path / "grpc", progress=False, report=False, timeout_s=240)
    assert result.summary["dead_peers"] == [] and sorted(result.final_models) == [0, 1, 2]
    simulated = _run(config)  # every process counts layer names afresh: the layouts agree
    assert result.final_models[0].layout == simulated.final_models[0].layout
    assert result.summary["mean_final_accuracy"] > 0.5


def test_lightning_hooks_are_called_in_lightnings_order():
    config = resolve_config({"train.model": "framework_models_for_tests:HookedLightning"}).train
    learner = make_learner(config, (1, 8, 8), 10)
    data, _ = load_dataset(resolve_config({}).data, 0)
    result = learner.train(learner.init_params(0), data, torch.Generator().manual_seed(0), 10)
    assert result.steps == 3 and result.samples == 3 * config.batch_size  # -1 from on_train_batch_start stopped it
    one = ["on_train_batch_start", "optimizer_step", "optimizer_zero_grad", "on_before_backward", "on_after_backward",
           "on_before_optimizer_step", "on_train_batch_end", "lr_scheduler_step"]  # the closure runs inside optimizer_step
    assert learner.module.calls == one * 3 + ["on_train_batch_start"]
    assert set(learner.logged) == {"train_loss"}
