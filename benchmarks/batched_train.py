"""How much faster is training K models at once? TorchLearner job after job vs BatchedTrainer.

K models of the MNIST-shaped MLP (784-256-128-10) on synthetic data (600 samples each, 10
classes, batch 32, one epoch: 19 steps, the last one short), plain SGD. Three numbers per K,
in trained samples per second: `sequential` (TorchLearner.train per job), `batched`
(BatchedTrainer.train_many on all jobs, data gathering and chunking included) and `bare_step`
(the vmapped gradient + SGD step alone on one fixed full batch per model: the ceiling).
Also the largest |difference| of the trained parameters between the two. Prints JSON.

    python benchmarks/batched_train.py --models 10 100 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from meshfl.config import TrainConfig
from meshfl.data import Dataset
from meshfl.learn.batched import BatchedTrainer, TrainJob
from meshfl.learn.learner import TorchLearner

FEATURES = (1, 28, 28)
CLASSES = 10


def make_jobs(learner: TorchLearner, k: int, samples: int, steps: int) -> list[TrainJob]:
    g = torch.Generator().manual_seed(0)
    start = learner.init_params(0)
    return [TrainJob(start, Dataset(torch.rand(samples, *FEATURES, generator=g),
                                    torch.randint(0, CLASSES, (samples,), generator=g), CLASSES, f"peer{i}"),
                     torch.Generator().manual_seed(i), steps) for i in range(k)]


def best_of(repeats: int, work, setup=lambda: None) -> tuple[float, object]:
    """(least wall seconds of `work(setup())` over `repeats` runs, the last result); setup untimed."""
    times, result = [], None
    for _ in range(repeats):
        given = setup()
        start = time.perf_counter()
        result = work(given)
        times.append(time.perf_counter() - start)
    return min(times), result


def bare_step_seconds(trainer: BatchedTrainer, jobs: list[TrainJob], batch: int, steps: int) -> float:
    """Seconds per vmapped step of all models on one fixed full batch each (no gathering)."""
    params = torch.stack([j.params.flat for j in jobs]).to(trainer.device)
    x = torch.stack([j.data.x[:batch] for j in jobs]).to(trainer.device)
    y = torch.stack([j.data.y[:batch] for j in jobs]).to(trainer.device)
    mask = torch.ones(len(jobs), batch, device=trainer.device)
    count = torch.full((len(jobs),), float(batch), device=trainer.device)
    update = trainer._state(params)

    def run(_given) -> None:
        for t in range(steps):
            grads, _ = trainer._step(trainer._views(params, len(jobs)), x, y, mask, count)
            update(t, len(jobs), grads)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
    return best_of(1, run)[0] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(model="mlp", optimizer="sgd", learning_rate=0.05, batch_size=args.batch_size,
                         local_epochs=1, device=args.device)
    learner = TorchLearner(config, FEATURES, CLASSES)
    trainer = BatchedTrainer(config, FEATURES, CLASSES)
    steps = learner.steps_for(args.samples)
    out: dict = {"device": args.device, "threads": torch.get_num_threads(), "samples_per_model": args.samples,
                 "batch_size": args.batch_size, "steps": steps, "models_per_chunk": trainer.models_per_chunk,
                 "runs": []}
    warm = make_jobs(learner, 2, args.samples, 2)  # first calls pay one-off costs: not timed
    learner.train(warm[0].params, warm[0].data, warm[0].generator, 2)
    trainer.train_many(warm)
    for k in args.models:
        fresh = functools.partial(make_jobs, learner, k, args.samples, steps)
        sequential, one_by_one = best_of(
            args.repeats, lambda jobs: [learner.train(j.params, j.data, j.generator, j.steps) for j in jobs], fresh)
        batched, at_once = best_of(args.repeats, trainer.train_many, fresh)
        total = sum(r.samples for r in one_by_one)
        bare = bare_step_seconds(trainer, make_jobs(learner, k, args.samples, steps), args.batch_size, min(steps, 5))
        difference = max(float((a.params.flat - b.params.flat).abs().max())
                         for a, b in zip(one_by_one, at_once, strict=True))
        run = {"models": k, "samples": total,
               "sequential_samples_per_s": total / sequential,
               "batched_samples_per_s": total / batched,
               "bare_step_samples_per_s": k * args.batch_size / bare,
               "max_abs_difference": difference}
        run["batched_vs_sequential"] = run["batched_samples_per_s"] / run["sequential_samples_per_s"]
        run["bare_vs_sequential"] = run["bare_step_samples_per_s"] / run["sequential_samples_per_s"]
        out["runs"].append(run)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
