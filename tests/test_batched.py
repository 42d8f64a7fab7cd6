"""BatchedTrainer.train_many trains each job as TorchLearner.train would, all jobs at once."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meshfl.config import TrainConfig
from meshfl.data import Dataset
from meshfl.learn.batched import CHUNK_ELEMENTS, BatchedTrainer, TrainJob
from meshfl.learn.learner import TorchLearner

CLASSES = 5
SHAPES = {"mlp": (20,), "cnn": (1, 8, 8)}
# (samples, steps) with batch size 8: several passes, data smaller than a batch (every batch
# short), zero steps, no data at all, and jobs ending at different steps.
JOBS = ((30, 7), (5, 3), (17, 0), (12, 4), (40, 10), (9, 1), (0, 2))
OPTIMIZERS = {"sgd": dict(optimizer="sgd", momentum=0.0, learning_rate=0.05),
              "momentum": dict(optimizer="sgd", momentum=0.9, learning_rate=0.05),
              "adam": dict(optimizer="adam", learning_rate=0.01)}
# Largest |batched - TorchLearner| over all parameters, relative to the largest |parameter|,
# measured on CPU with torch 2.13 and one thread (as these tests run): mlp 0, bit-identical
# (linear layers run as baddbmm/bmm, which round as addmm/mm do); cnn 4e-8 sgd, 9e-8 momentum,
# 1.1e-6 adam (vmapped convolutions run as one grouped convolution, which rounds differently;
# Adam amplifies that on near-zero gradients). Losses within 3e-7. With two threads the
# reductions split differently: up to 1.4e-5 (mlp) and 1.8e-5 (cnn) with adam, 1e-7 with sgd.
RELATIVE_TOLERANCE = 1e-5


def config(model: str, optimizer: str) -> TrainConfig:
    return TrainConfig(model=model, batch_size=8, **OPTIMIZERS[optimizer])


def jobs(learner: TorchLearner, model: str) -> list[TrainJob]:
    out = []
    for i, (samples, steps) in enumerate(JOBS):
        g = torch.Generator().manual_seed(100 + i)
        data = Dataset(torch.randn(samples, *SHAPES[model], generator=g),
                       torch.randint(0, CLASSES, (samples,), generator=g), CLASSES, f"peer{i}")
        out.append(TrainJob(learner.init_params(i), data, torch.Generator().manual_seed(i), steps))
    return out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model", sorted(SHAPES))
def test_train_many_matches_torch_learner_job_by_job(model, optimizer):
    cfg = config(model, optimizer)
    learner = TorchLearner(cfg, SHAPES[model], CLASSES)
    one_by_one, batched = jobs(learner, model), jobs(learner, model)
    expected = [learner.train(j.params, j.data, j.generator, j.steps) for j in one_by_one]
    got = BatchedTrainer(cfg, SHAPES[model], CLASSES).train_many(batched)
    for job, ref, mine, twin in zip(batched, expected, got, one_by_one, strict=True):
        assert (mine.samples, mine.steps) == (ref.samples, ref.steps)
        if ref.steps == 0:
            assert mine.params is job.params and math.isnan(mine.loss)
        else:
            assert relative_difference(mine.params.flat, ref.params.flat) <= RELATIVE_TOLERANCE
            if model == "mlp":
                assert torch.equal(mine.params.flat, ref.params.flat)
            assert mine.loss == pytest.approx(ref.loss, abs=1e-5)
        # The generator ends where TorchLearner left it.
        assert torch.equal(torch.randperm(50, generator=job.generator), torch.randperm(50, generator=twin.generator))
    assert [r.samples for r in got] == [54, 15, 0, 24, 80, 8, 0]  # short last batches count as they are


@pytest.mark.parametrize("model", sorted(SHAPES))
def test_runs_are_bit_identical_and_chunking_changes_nothing(model):
    cfg = config(model, "adam")
    learner = TorchLearner(cfg, SHAPES[model], CLASSES)
    first = BatchedTrainer(cfg, SHAPES[model], CLASSES).train_many(jobs(learner, model))
    again = BatchedTrainer(cfg, SHAPES[model], CLASSES).train_many(jobs(learner, model))
    chunked_trainer = BatchedTrainer(cfg, SHAPES[model], CLASSES, max_models_per_chunk=2)
    assert chunked_trainer.models_per_chunk == 2
    chunked = chunked_trainer.train_many(jobs(learner, model))
    for a, b, c in zip(first, again, chunked, strict=True):
        assert torch.equal(a.params.flat, b.params.flat) and a.samples == b.samples
        assert a.loss == b.loss or (math.isnan(a.loss) and math.isnan(b.loss))
        assert relative_difference(c.params.flat, a.params.flat) <= RELATIVE_TOLERANCE
        if model == "mlp":
            assert torch.equal(c.params.flat, a.params.flat)
        assert (c.samples, c.steps) == (a.samples, a.steps)


def test_jobs_sharing_a_generator_draw_in_job_order():
    """One peer's two requests share its generator: the batches follow the jobs' order, not
    the order (by steps) in which they are trained."""
    cfg = config("mlp", "momentum")
    learner = TorchLearner(cfg, SHAPES["mlp"], CLASSES)
    expected, mine = jobs(learner, "mlp")[:2], jobs(learner, "mlp")[:2]
    shared = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    expected = [TrainJob(j.params, j.data, shared[0], j.steps) for j in expected]
    mine = [TrainJob(j.params, j.data, shared[1], j.steps) for j in reversed(mine)]  # 3 steps first, then 7
    reference = [learner.train(j.params, j.data, j.generator, j.steps) for j in reversed(expected)]
    got = BatchedTrainer(cfg, SHAPES["mlp"], CLASSES, max_models_per_chunk=1).train_many(mine)
    for a, b in zip(reference, got, strict=True):
        assert torch.equal(a.params.flat, b.params.flat) and a.samples == b.samples
    assert torch.equal(torch.randperm(9, generator=shared[0]), torch.randperm(9, generator=shared[1]))


def test_default_chunk_bounds_memory_and_32_bit_indexing():
    for model, shape in (("mlp", (1, 28, 28)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32))):
        trainer = BatchedTrainer(TrainConfig(model=model, batch_size=32), shape, 10)
        k = trainer.models_per_chunk
        assert k >= 1 and k * trainer.layout.numel * 6 <= CHUNK_ELEMENTS < 2**31
        assert k * 32 * math.prod(shape) < 2**31
        assert BatchedTrainer(TrainConfig(model=model), shape, 10, max_models_per_chunk=10**6).models_per_chunk == k


def test_empty_and_invalid_jobs():
    cfg = config("mlp", "sgd")
    learner = TorchLearner(cfg, SHAPES["mlp"], CLASSES)
    trainer = BatchedTrainer(cfg, SHAPES["mlp"], CLASSES)
    assert trainer.train_many([]) == []
    job = jobs(learner, "mlp")[0]
    with pytest.raises(ValueError, match="steps"):
        trainer.train_many([TrainJob(job.params, job.data, job.generator, -1)])
    other = TorchLearner(cfg, (7,), CLASSES).init_params(0)
    with pytest.raises(ValueError, match="layout"):
        trainer.train_many([TrainJob(other, job.data, job.generator, 1)])
    with pytest.raises(ValueError, match="max_models_per_chunk"):
        BatchedTrainer(cfg, SHAPES["mlp"], CLASSES, max_models_per_chunk=0)


def test_benchmark_reports_all_three_rates():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "benchmarks/batched_train.py", "--models", "2", "--samples", "40"],
                          capture_output=True, text=True, cwd=root, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(done.stdout)["runs"]
    assert run["samples"] == 80 and run["max_abs_difference"] == 0.0
    assert min(run["sequential_samples_per_s"], run["batched_samples_per_s"], run["bare_step_samples_per_s"]) > 0
