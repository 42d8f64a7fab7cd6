"""The model zoo: LeNet-5 (shape, parameter count, errors, training on MNIST, batched training)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from meshfl.config import ConfigError, DataConfig, TrainConfig, load_config
from meshfl.data import Dataset, load_dataset, mnist
from meshfl.learn.batched import BatchedTrainer, TrainJob, batching_refusal
from meshfl.learn.learner import TorchLearner
from meshfl.learn.models import MODELS, build_model, lenet5

# $MESHFL_DATA (the README's test command sets ../shared/data), else ../shared/data beside the repository
SHARED_DATA = Path(os.environ.get("MESHFL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data").expanduser()
needs_mnist = pytest.mark.skipif(not all((SHARED_DATA / "mnist" / name).is_file() for name in mnist.FILES),
                                 reason=f"MNIST files absent from {SHARED_DATA / 'mnist'} (set MESHFL_DATA)")
LENET5_MNIST_PARAMETERS = 61_706  # 156 + 2,416 + 48,120 + 10,164 + 850


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_lenet5_on_mnist_shapes_has_the_classic_parameter_count():
    net = build_model("lenet5", (1, 28, 28), 10)
    assert "lenet5" in MODELS
    assert parameters(net) == LENET5_MNIST_PARAMETERS
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert [m.out_channels for m in net if isinstance(m, torch.nn.Conv2d)] == [6, 16]
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [120, 84, 10]
    assert not any(isinstance(m, torch.nn.Tanh) for m in net) and any(isinstance(m, torch.nn.MaxPool2d) for m in net)


@pytest.mark.parametrize(("shape", "classes", "flat"),
                         [((3, 32, 32), 100, 16 * 6 * 6), ((1, 12, 12), 5, 16), ((2, 28, 40), 7, 16 * 5 * 8)])
def test_lenet5_computes_its_flatten_size_from_the_image(shape, classes, flat):
    net = lenet5(shape, classes)
    assert next(m for m in net if isinstance(m, torch.nn.Linear)).in_features == flat
    assert net(torch.zeros(2, *shape)).shape == (2, classes)


@pytest.mark.parametrize(("shape", "message"), [((784,), r"needs image data shaped \[channels, height, width\]"),
                                                ((1, 8, 8), "at least 12x12, got 8x8; use cnn")])
def test_lenet5_refuses_data_it_cannot_take_in_one_line(shape, message):
    with pytest.raises(ValueError, match=message) as info:
        build_model("lenet5", shape, 10)
    assert "train.model=lenet5" in str(info.value) and "\n" not in str(info.value)


def test_lenet5_is_a_config_value_and_batches_like_the_other_zoo_models():
    assert load_config(None, ["train.model=lenet5"]).train.model == "lenet5"
    assert batching_refusal(TrainConfig(model="lenet5")) is None
    with pytest.raises(ConfigError, match="train.model: must be mlp, cnn or lenet5 or a factory"):
        load_config(None, ["train.model=lenet"])


def test_batched_lenet5_trains_as_torch_learner_does():
    torch.set_num_threads(1)
    cfg = TrainConfig(model="lenet5", batch_size=8, optimizer="sgd", learning_rate=0.05)
    shape, classes = (1, 12, 12), 5
    learner = TorchLearner(cfg, shape, classes)

    def job(i: int) -> TrainJob:
        g = torch.Generator().manual_seed(10 + i)
        data = Dataset(torch.randn(20 + i, *shape, generator=g), torch.randint(0, classes, (20 + i,), generator=g),
                                   classes, f"p{i}")
        return TrainJob(learner.init_params(i), data, torch.Generator().manual_seed(i), 3 + i)

    expected = [learner.train(j.params, j.data, j.generator, j.steps) for j in (job(0), job(1), job(2))]
    got = BatchedTrainer(cfg, shape, classes).train_many([job(0), job(1), job(2)])
    for ref, mine in zip(expected, got, strict=True):
        assert (mine.samples, mine.steps) == (ref.samples, ref.steps)
        difference = float((mine.params.flat - ref.params.flat).abs().max() / ref.params.flat.abs().max())
        assert difference <= 1e-5 and mine.loss == pytest.approx(ref.loss, abs=1e-5)


@needs_mnist
def test_lenet5_learns_mnist_in_a_few_steps(monkeypatch):
    monkeypatch.setenv("MESHFL_DATA", str(SHARED_DATA))
    torch.manual_seed(0)
    train, test = load_dataset(DataConfig(dataset="mnist", download=False), 0)
    cfg = TrainConfig(model="lenet5", batch_size=32, learning_rate=0.01, momentum=0.9)
    learner = TorchLearner(cfg, train.feature_shape, train.num_classes)
    params = learner.init_params(0)
    subset = train.subset(torch.arange(2000))
    held_out = test.subset(torch.arange(1000))
    before = learner.evaluate(params, held_out)
    result = learner.train(params, subset, torch.Generator().manual_seed(0), 60)
    after = learner.evaluate(result.params, held_out)
    assert result.steps == 60 and math.isfinite(result.loss)
    assert after.loss < before.loss and after.accuracy > 0.5 > before.accuracy
