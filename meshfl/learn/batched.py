"""Train many models at once: the groundwork for vectorised training in the simulator.

`BatchedTrainer.train_many(jobs)` gives, job by job, what `TorchLearner.train` gives (to
float32 rounding): the same mini-batches drawn from each job's own generator, the same
optimiser arithmetic, the same samples, steps and mean loss. Instead of one module trained
job after job, the jobs' flat parameters are stacked (K x P) and one step of every model is
one `torch.func.vmap(grad(...))` call over `functional_call` of a template module, followed
by an optimiser step on the stacked tensors.

How jobs of different sizes share a step:
- Each job's batches come from `batch_indices(len(data), steps, batch_size, generator)` drawn
  up front, so the generator ends exactly where `TorchLearner.train` leaves it.
- Jobs are sorted by step count (longest first, stable) before chunking, so at step t the
  models still training are a prefix of the chunk: the step runs on that prefix only. A job
  with fewer steps is simply not in the prefix any more: its parameters and optimiser state
  are not touched (and no compute is spent on it).
- A short batch (the last of a pass, or all of them when the data is smaller than a batch) is
  padded to the step's longest batch and masked: the loss is sum(mask * ce) / n, the masked
  mean that equals `F.cross_entropy`'s mean over the n real samples.
- The chunk's data is one concatenated tensor; a job's batch indices are offset into it.

Not yet used by the simulator (see ARCHITECTURE.md, "Batched training").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pad_sequence

from meshfl.config import TrainConfig
from meshfl.core.context import TrainResult
from meshfl.core.params import Layout, Params
from meshfl.data import Dataset
from meshfl.learn.learner import batch_indices
from meshfl.learn.models import build_model

# Elements (float32) one chunk may hold at once: 2^28 = 1 GiB. Far below 2^31, so no tensor of
# a chunk needs 64-bit indexing.
CHUNK_ELEMENTS = 1 << 28
# Per model and step: parameters, gradient, two optimiser states and temporaries of the update.
PARAM_COPIES = 6
# Per sample: forward activations kept for backward, their gradients, and the gathered input.
ACTIVATION_COPIES = 3
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TrainJob:
    """One training request: `steps` mini-batch steps of `params` on `data`, batches drawn from `generator`."""

    params: Params
    data: Dataset
    generator: torch.Generator
    steps: int


class _Linear(torch.autograd.Function):
    """`F.linear` whose vmapped forward is `baddbmm`, which rounds exactly as the unbatched
    `addmm` does (vmap's own rule for linear is matmul then add, which rounds differently).
    Its backward is addmm's, in plain tensor ops, so under vmap it becomes `bmm`, which again
    rounds as `mm` does."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.mm(weight) if ctx.needs_input_grad[0] else None  # not for the input layer
        return grad_x, grad_out.t().mm(x), grad_out.sum(0)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias):
        x, weight, bias = (t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                           for t, d in zip((x, weight, bias), in_dims, strict=True))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)), 0


class _ExactLinear(nn.Linear):
    """nn.Linear whose forward is `_Linear` on [batch, features] input (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or self.bias is None:
            return super().forward(x)
        return _Linear.apply(x, self.weight, self.bias)


def _exact_linears(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = _ExactLinear
    return module


def _activation_elements(module: nn.Module, feature_shape: tuple[int, ...]) -> int:
    """Output elements of every leaf module for one sample (a bound on what backward keeps)."""
    total = math.prod(feature_shape)
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
             for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(torch.zeros((1, *feature_shape), device=next(module.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return total + sum(outputs)


class BatchedTrainer:
    """Trains K models of one architecture at once; results match `TorchLearner.train` per job."""

    def __init__(self, config: TrainConfig, feature_shape: tuple[int, ...], num_classes: int, *,
                 max_models_per_chunk: int | None = None) -> None:
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        if max_models_per_chunk is not None and max_models_per_chunk < 1:
            raise ValueError(f"max_models_per_chunk must be >= 1, got {max_models_per_chunk}")
        self.config = config
        self.device = torch.device(config.device)
        self.feature_shape = tuple(feature_shape)
        self.num_classes = num_classes
        self.module = _exact_linears(build_model(config.model, self.feature_shape, num_classes, config.model_options)).to(self.device)
        self.layout = Layout.of_module(self.module)
        if Layout.of_module(self.module, buffers=True) != self.layout:
            raise ValueError("BatchedTrainer: models with buffers (batch norm) are not supported; use TorchLearner")
        per_model = (PARAM_COPIES * self.layout.numel
                     + ACTIVATION_COPIES * config.batch_size * _activation_elements(self.module, self.feature_shape))
        self.default_chunk = max(1, CHUNK_ELEMENTS // per_model)
        self.models_per_chunk = min(self.default_chunk, max_models_per_chunk or self.default_chunk)
        self._step = vmap(grad(self._loss, has_aux=True))

    def _loss(self, named: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
              count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean cross-entropy of one model on one padded batch (vmapped over models)."""
        logits = functional_call(self.module, named, (x,))
        loss = (F.cross_entropy(logits, y, reduction="none") * mask).sum() / count
        return loss, loss.detach()

    def _views(self, stacked: torch.Tensor, active: int) -> dict[str, torch.Tensor]:
        """Each named tensor of models [0, active) as a [active, *shape] view into `stacked` (K x P).

        Gradients come back per tensor and the optimiser updates these views in place, so no
        step ever assembles a K x P gradient (a cat of the whole stack costs as much as a matmul)."""
        return {name: stacked[:active, offset:offset + size].view(active, *shape) for name, shape, offset, size
                in zip(self.layout.names, self.layout.shapes, self.layout.offsets, self.layout.sizes, strict=True)}

    def train_many(self, jobs: list[TrainJob]) -> list[TrainResult]:
        """Train every job; result i belongs to job i."""
        for job in jobs:
            if job.steps < 0:
                raise ValueError(f"TrainJob: steps must be >= 0, got {job.steps}")
            if job.params.layout.fingerprint != self.layout.fingerprint:
                raise ValueError("TrainJob: params layout differs from the trainer's model")
        results: list[TrainResult | None] = [None] * len(jobs)
        busy = []
        for i, job in enumerate(jobs):
            if len(job.data) == 0 or job.steps == 0:
                results[i] = TrainResult(job.params, 0, 0, float("nan"))
            else:
                busy.append(i)
        # Batches first, in job order (two jobs may share a generator: one peer's two requests),
        # each from its job's generator exactly as TorchLearner.train draws them.
        batches = {i: batch_indices(len(jobs[i].data), jobs[i].steps, self.config.batch_size, jobs[i].generator)
                   for i in busy}
        busy.sort(key=lambda i: -jobs[i].steps)  # stable: ties keep job order
        start = 0
        while start < len(busy):
            # The chunk's index table holds steps x batch entries per model (its first job has the most steps).
            size = max(1, min(self.models_per_chunk, CHUNK_ELEMENTS // (jobs[busy[start]].steps * self.config.batch_size)))
            chunk = busy[start:start + size]
            start += size
            for i, result in zip(chunk, self._train_chunk([jobs[i] for i in chunk], [batches[i] for i in chunk]),
                                 strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _train_chunk(self, jobs: list[TrainJob], batches: list[list[torch.Tensor]]) -> list[TrainResult]:
        """Jobs sorted by steps, longest first, every one with data and steps; their batches."""
        config, device = self.config, self.device
        k = len(jobs)
        datasets: dict[int, int] = {}  # id(dataset) -> offset in the concatenation
        parts_x, parts_y, offsets, total = [], [], [], 0
        for job in jobs:
            if id(job.data) not in datasets:
                datasets[id(job.data)] = total
                parts_x.append(job.data.x)
                parts_y.append(job.data.y)
                total += len(job.data)
            offsets.append(datasets[id(job.data)])
        x_all = torch.cat(parts_x).to(device)
        y_all = torch.cat(parts_y).to(device)
        params = torch.stack([job.params.flat for job in jobs]).to(device)
        optimizer = self._state(params)
        total_loss = torch.zeros(k, device=device)
        samples = [sum(len(b) for b in job_batches) for job_batches in batches]
        steps = [job.steps for job in jobs]
        # Every job's batches as rows of one [K, steps, batch] index tensor, -1 past a short
        # batch's end and past a job's last step (two tensor ops per job, none per step and job).
        table = torch.full((k, steps[0], config.batch_size), -1, dtype=torch.int64)
        for j, job_batches in enumerate(batches):
            rows = pad_sequence(job_batches, batch_first=True, padding_value=-1)
            table[j, :rows.shape[0], :rows.shape[1]] = rows
        starts = torch.tensor(offsets, dtype=torch.int64)[:, None]
        for t in range(steps[0]):
            active = sum(1 for s in steps if s > t)  # a prefix: jobs are sorted by steps
            rows = table[:active, t]
            real = rows >= 0
            lengths = real.sum(1)
            rows = rows[:, :int(lengths.max())]  # pad only to the step's longest batch
            real = rows >= 0
            index = torch.where(real, rows + starts[:active], starts[:active]).to(device)
            mask = real.to(device=device, dtype=torch.float32)
            count = lengths.to(device=device, dtype=torch.float32)
            grads, losses = self._step(self._views(params, active), x_all[index], y_all[index], mask, count)
            optimizer(t, active, grads)
            total_loss[:active] += losses
        trained = params.to("cpu")
        loss = total_loss.to("cpu")
        return [TrainResult(Params(trained[j].clone(), self.layout), samples[j], steps[j], float(loss[j]) / steps[j])
                for j in range(k)]

    def _state(self, params: torch.Tensor):
        """A functional optimiser over stacked params: `update(t, active, grads)` steps models
        [0, active) with their step-t gradients (per named tensor, [active, *shape]), in
        torch.optim's own arithmetic: SGD with dampening 0, no nesterov, no weight decay;
        Adam with its defaults. Models past `active` and their state are not touched."""
        lr = self.config.learning_rate
        views = self._views
        if self.config.optimizer == "adam":
            beta1, beta2 = ADAM_BETAS
            exp_avgs, exp_avg_sqs = torch.zeros_like(params), torch.zeros_like(params)

            def adam(t: int, active: int, grads: dict[str, torch.Tensor]) -> None:
                # torch.optim.Adam._single_tensor_adam; every active model is at step t + 1.
                step = float(t + 1)
                step_size = lr / (1 - beta1 ** step)
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                param, exp_avg, exp_avg_sq = views(params, active), views(exp_avgs, active), views(exp_avg_sqs, active)
                for name, g in grads.items():
                    exp_avg[name].lerp_(g, 1 - beta1)
                    exp_avg_sq[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (exp_avg_sq[name].sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
                    param[name].addcdiv_(exp_avg[name], denom, value=-step_size)
            return adam
        momentum = self.config.momentum
        if momentum == 0:
            def sgd(t: int, active: int, grads: dict[str, torch.Tensor]) -> None:
                param = views(params, active)
                for name, g in grads.items():
                    param[name].add_(g, alpha=-lr)
            return sgd
        buffers = torch.empty_like(params)

        def sgd_momentum(t: int, active: int, grads: dict[str, torch.Tensor]) -> None:
            # torch.optim.SGD._single_tensor_sgd: the first step's buffer is the gradient itself.
            param, buffer = views(params, active), views(buffers, active)
            for name, g in grads.items():
                if t == 0:
                    buffer[name].copy_(g)
                else:
                    buffer[name].mul_(momentum).add_(g, alpha=1)
                param[name].add_(buffer[name], alpha=-lr)
        return sgd_momentum
