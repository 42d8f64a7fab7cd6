"""Training and evaluation requests of one virtual instant, run together.

A simulated peer that calls `ctx.train` or `ctx.evaluate` does not compute at once: its
request joins the queue and the peer waits. When every peer is blocked and the clock would
move on (the virtual-time loop calls `flush` then), the queue runs all requests of that
instant: training as one vmapped batch of models (`BatchedTrainer.train_many`), global
evaluations as one batched forward per distinct model, then it answers the requests in the
order they were made. No virtual time passes in between, so a request made at t is answered
at t, and the peer then sleeps for its compute cost exactly as before.

`compute.batching=off` keeps the same queue and the same order but runs each request alone
with the peer's TorchLearner: the two modes differ only in float32 rounding, which is what the
agreement tests compare. Requests of a peer that crashed while waiting are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshfl.config import ExperimentConfig
from meshfl.core.params import Params
from meshfl.data import Dataset
from meshfl.learn.batched import BatchedTrainer, TrainJob, batching_refusal
from meshfl.learn.learner import Evaluation
from meshfl.runtime.peer import Worlds


@dataclass
class _Request:
    future: asyncio.Future
    job: TrainJob | None = None  # a training request
    params: Params | None = None  # an evaluation request: the model,
    local_test: Dataset | None = None  # the peer's local test split,
    answer: Callable[[Evaluation, Evaluation], Any] | None = None  # and how (local, global) become its answer


class ComputeQueue:
    """The simulator's pending training and evaluation requests (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, worlds: Worlds) -> None:
        self._worlds = worlds
        self._requests: list[_Request] = []
        self.trainer: BatchedTrainer | None = None
        self.refusal = batching_refusal(config.train)
        if config.compute.batching == "on" and self.refusal is not None:
            raise ValueError(f"compute.batching=on, but these models cannot be batched: {self.refusal}; "
                             "use compute.batching=auto or off")
        if config.compute.batching != "off" and self.refusal is None:
            learner = worlds.learner
            self.trainer = BatchedTrainer(config.train, tuple(learner.feature_shape), learner.num_classes)
            self.trainer.use_data([data.train for data in worlds.peer_data])
        if worlds.learner.device.type != "cpu":  # every model stays on the GPU: no copies per request
            worlds.learner.keep_params_on_device()
            if self.trainer is not None:
                self.trainer.params_device = self.trainer.device
        # Evaluation is batched on a GPU (or with batching=on): on CPU the stacked forward over 4,096
        # test samples per model measured slower than one model at a time (12.5 s vs 9.1 s, 100 peers).
        self.batch_evaluations = self.trainer is not None and (
            config.compute.batching == "on" or self.trainer.device.type != "cpu")
        self.flushes = 0
        self.batched_jobs = 0
        # wall-clock accounting for benchmarks; never read by the simulation itself
        self.train_seconds = 0.0
        self.train_samples = 0
        self.evaluate_seconds = 0.0

    @property
    def batched(self) -> bool:
        return self.trainer is not None

    def __len__(self) -> int:
        return len(self._requests)

    def train(self, job: TrainJob) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(future, job=job))
        return future

    def evaluate(self, params: Params, local_test: Dataset, answer: Callable[[Evaluation, Evaluation], Any]) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(future, params=params, local_test=local_test, answer=answer))
        return future

    def flush(self) -> bool:
        """Run every pending request and answer it; False when there was none."""
        if not self._requests:
            return False
        requests, self._requests = self._requests, []
        live = [r for r in requests if not r.future.done()]  # a crashed peer's request was cancelled
        self.flushes += 1
        trains = [r for r in live if r.job is not None]
        evaluations = [r for r in live if r.job is None]
        answers: dict[int, Any] = {}
        failures: dict[int, BaseException] = {}
        started = time.perf_counter()
        self._train(trains, answers, failures)
        trained = time.perf_counter()
        self._evaluate(evaluations, answers, failures)
        self.train_seconds += trained - started
        self.evaluate_seconds += time.perf_counter() - trained
        self.train_samples += sum(answers[id(r)].samples for r in trains if id(r) in answers)
        for r in live:  # in request order: the peers resume in the order they asked
            if id(r) in failures:
                r.future.set_exception(failures[id(r)])
            else:
                r.future.set_result(answers[id(r)])
        return True

    def _train(self, requests: list[_Request], answers: dict[int, Any], failures: dict[int, BaseException]) -> None:
        if not requests:
            return
        jobs = [r.job for r in requests]
        if self.trainer is not None and len(jobs) > 1:
            try:
                results = self.trainer.train_many(jobs)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - every peer of the batch gets the error as its own
                failures.update((id(r), exc) for r in requests)
                return
            self.batched_jobs += len(jobs)
            answers.update((id(r), result) for r, result in zip(requests, results, strict=True))
            return
        learner = self._worlds.learner
        for r in requests:  # one at a time (batching off or not possible, or a lone request)
            job = r.job
            assert job is not None
            try:
                answers[id(r)] = learner.train(job.params, job.data, job.generator, job.steps)
            except Exception as exc:  # noqa: BLE001 - that peer's crash, as if it had trained alone
                failures[id(r)] = exc

    def _evaluate(self, requests: list[_Request], answers: dict[int, Any], failures: dict[int, BaseException]) -> None:
        if not requests:
            return
        worlds, learner = self._worlds, self._worlds.learner
        batched: dict[Any, Evaluation] = {}
        if self.batch_evaluations:  # the distinct models not evaluated yet on the global test set, at once
            fresh: dict[Any, Params] = {}
            for r in requests:
                assert r.params is not None
                key = _model_key(r.params)
                if key not in fresh and not (isinstance(key, str) and worlds.knows_global(r.params)):
                    fresh[key] = r.params
            if len(fresh) > 1:
                try:
                    models = list(fresh.values())
                    for key, evaluation in zip(fresh, self.trainer.evaluate_many(models, worlds.global_test), strict=True):
                        batched[key] = evaluation
                        if isinstance(key, str):
                            worlds.remember_global(fresh[key], evaluation)
                except Exception as exc:  # noqa: BLE001
                    failures.update((id(r), exc) for r in requests)
                    return
        local: list[Evaluation] | None = None
        if self.batch_evaluations and len(requests) > 1:  # every model on its own peer's local test split, at once
            try:
                local = self.trainer.evaluate_each([(r.params, r.local_test) for r in requests])  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001
                failures.update((id(r), exc) for r in requests)
                return
        for j, r in enumerate(requests):
            assert r.params is not None and r.local_test is not None and r.answer is not None
            try:
                global_ = batched.get(_model_key(r.params)) or worlds.evaluate_global(r.params)
                answers[id(r)] = r.answer(local[j] if local is not None else learner.evaluate(r.params, r.local_test), global_)
            except Exception as exc:  # noqa: BLE001
                failures[id(r)] = exc



def _model_key(params: Params) -> Any:
    """Which requests share one global evaluation: equal models on the CPU (by digest, so the
    peers of a converged round share it), the same object on a GPU (a digest would copy every
    model back to the CPU; equal copies are just evaluated again, in the same batch)."""
    return params.digest if params.flat.device.type == "cpu" else id(params)
