"""Train many models at once: the groundwork for vectorised training in the simulator.

`BatchedTrainer.train_many(jobs)` gives, job by job, what `TorchLearner.train` gives (to
float32 rounding): the same mini-batches drawn from each job's own generator, the same
optimiser arithmetic, the same samples, steps and mean loss. Instead of one module trained
job after job, the jobs' flat parameters are stacked (K x P) and one step of every model is
one `torch.func.vmap(grad(...))` call over `functional_call` of a template module, followed
by an optimiser step on the stacked tensors.

How jobs of different sizes share a step:
- Each job's batches come from the permutations `batch_indices(len(data), steps, batch_size,
  generator)` would draw (one per pass), drawn up front, so the generator ends exactly where
  `TorchLearner.train` leaves it.
- Jobs are sorted by step count (longest first, stable) before chunking, so at step t the
  models still training are a prefix of the chunk: the step runs on that prefix only. A job
  with fewer steps is simply not in the prefix any more: its parameters and optimiser state
  are not touched (and no compute is spent on it).
- A short batch (the last of a pass, or all of them when the data is smaller than a batch) is
  padded to the step's longest batch and masked: the loss is sum(mask * ce) / n, the masked
  mean that equals `F.cross_entropy`'s mean over the n real samples.
- The chunk's data is one concatenated tensor; a job's batch indices are offset into it.

The simulator trains and evaluates the requests of one virtual instant with it (see
meshfl/runtime/sim/compute_queue.py and ARCHITECTURE.md, "Batched training").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from meshfl.config import TrainConfig
from meshfl.core.context import TrainResult
from meshfl.core.params import Layout, Params
from meshfl.data import Dataset
from meshfl.learn.learner import EVAL_BATCH, Evaluation, resolve_device
from meshfl.learn.models import build_model, is_user_model

# Elements (float32) one chunk may hold at once: 2^28 = 1 GiB. Far below 2^31, so no tensor of
# a chunk needs 64-bit indexing.
CHUNK_ELEMENTS = 1 << 28
# Per model and step: parameters, gradient, two optimiser states and temporaries of the update.
PARAM_COPIES = 6
# Per sample: forward activations kept for backward, their gradients, and the gathered input.
ACTIVATION_COPIES = 3
# On a GPU a chunk may be larger (one big vmapped step keeps it busy): a quarter of its free
# memory, but below 2^31 elements, so every tensor of a chunk keeps 32-bit indexing.
CUDA_CHUNK_ELEMENTS_MAX = (1 << 31) - 1


def chunk_elements(device: torch.device) -> int:
    """float32 elements one chunk of models may hold on `device`."""
    if device.type != "cuda":
        return CHUNK_ELEMENTS
    free, _total = torch.cuda.mem_get_info(device)
    return max(CHUNK_ELEMENTS, min(CUDA_CHUNK_ELEMENTS_MAX, free // 4 // 4))
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def batching_refusal(config: TrainConfig) -> str | None:
    """Why models of this train config cannot be trained as one batch (None: they can).

    The batched step is plain cross-entropy through `functional_call`: a user model (random
    layers, buffers), a user loss or step, FedProx and user metrics go through TorchLearner.
    `train.buffers` needs no refusal: only a model with buffers is affected by it, and the batched
    models (mlp, cnn, lenet5) have none, so `local` and `average` batch alike (a model with buffers is refused
    as a user model, and `BatchedTrainer` refuses any module with buffers)."""
    if is_user_model(config.model):
        return f"train.model={config.model} is a user model (only the zoo models mlp, cnn and lenet5 are batched)"
    if config.loss != "cross_entropy":
        return f"train.loss={config.loss} (only cross_entropy is batched)"
    if config.step is not None:
        return f"train.step={config.step} is set"
    if config.fedprox_mu > 0:
        return f"train.fedprox_mu={config.fedprox_mu:g} is set"
    if config.metrics:
        return "train.metrics are set"
    return None


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


def _passes(samples: int, steps: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The permutations `batch_indices` draws for `steps` steps (one per pass over the data, from
    the same generator in the same order), not yet cut into batches."""
    per_pass = -(-samples // batch_size)
    return [torch.randperm(samples, generator=generator) for _ in range(-(-steps // per_pass))]


class BatchedTrainer:
    """Trains K models of one architecture at once; results match `TorchLearner.train` per job."""

    def __init__(self, config: TrainConfig, feature_shape: tuple[int, ...], num_classes: int, *,
                 max_models_per_chunk: int | None = None) -> None:
        if max_models_per_chunk is not None and max_models_per_chunk < 1:
            raise ValueError(f"max_models_per_chunk must be >= 1, got {max_models_per_chunk}")
        self.config = config
        self.device = resolve_device(config.device)
        self.feature_shape = tuple(feature_shape)
        self.num_classes = num_classes
        self.module = _exact_linears(build_model(config.model, self.feature_shape, num_classes, config.model_options)).to(self.device)
        self.layout = Layout.of_module(self.module)
        if Layout.of_module(self.module, buffers=True) != self.layout:
            raise ValueError("BatchedTrainer: models with buffers (batch norm) are not supported; use TorchLearner")
        per_model = (PARAM_COPIES * self.layout.numel
                     + ACTIVATION_COPIES * config.batch_size * _activation_elements(self.module, self.feature_shape))
        self.chunk_elements = chunk_elements(self.device)
        self.default_chunk = max(1, self.chunk_elements // per_model)
        self.models_per_chunk = min(self.default_chunk, max_models_per_chunk or self.default_chunk)
        self._step = vmap(grad(self._loss, has_aux=True))
        self._forward = vmap(self._logits, in_dims=(0, None))  # many models, one dataset
        self._forward_each = vmap(self._logits)  # model i on inputs i
        self.params_device = torch.device("cpu")
        """Where trained Params go: cpu, or the trainer's device when the simulator keeps models there."""
        self._pool: dict[int, int] = {}  # id(dataset) -> offset into _pool_x/_pool_y
        self._pool_x = self._pool_y = None
        self._pool_keep: list[Dataset] = []
        self._on_device: dict[int, tuple[Dataset, torch.Tensor, torch.Tensor]] = {}

    def use_data(self, datasets: list[Dataset]) -> None:
        """Keep these datasets concatenated on the trainer's device, once: a chunk whose jobs all
        train on them gathers its batches from there (no copy per chunk; on CUDA no transfer)."""
        self._pool, parts_x, parts_y, total = {}, [], [], 0
        for data in datasets:
            if id(data) not in self._pool and len(data):
                self._pool[id(data)] = total
                parts_x.append(data.x)
                parts_y.append(data.y)
                total += len(data)
        self._pool_keep = list(datasets)  # ids stay valid while the datasets live
        self._pool_x = torch.cat(parts_x).to(self.device) if parts_x else None
        self._pool_y = torch.cat(parts_y).to(self.device) if parts_y else None

    def _tensors(self, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """`data` on the device, moved once (the global test set is evaluated at every instant)."""
        if self.device.type == "cpu":
            return data.x, data.y
        held = self._on_device.get(id(data))
        if held is None or held[0] is not data:
            held = self._on_device[id(data)] = (data, data.x.to(self.device), data.y.to(self.device))
        return held[1], held[2]

    def _logits(self, named: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, named, (x,))

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
        batches = {i: _passes(len(jobs[i].data), jobs[i].steps, self.config.batch_size, jobs[i].generator)
                   for i in busy}
        busy.sort(key=lambda i: -jobs[i].steps)  # stable: ties keep job order
        start = 0
        while start < len(busy):
            # The chunk's index table holds steps x batch entries per model (its first job has the most steps).
            size = max(1, min(self.models_per_chunk, self.chunk_elements // (jobs[busy[start]].steps * self.config.batch_size)))
            chunk = busy[start:start + size]
            start += size
            for i, result in zip(chunk, self._train_chunk([jobs[i] for i in chunk], [batches[i] for i in chunk]),
                                 strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _train_chunk(self, jobs: list[TrainJob], batches: list[list[torch.Tensor]]) -> list[TrainResult]:
        """Jobs sorted by steps, longest first, every one with data and steps; their passes (`_passes`)."""
        config, device = self.config, self.device
        k = len(jobs)
        if all(id(job.data) in self._pool for job in jobs):
            x_all, y_all = self._pool_x, self._pool_y
            offsets = [self._pool[id(job.data)] for job in jobs]
        else:  # a dataset outside the pool (e.g. a label-flipping peer's): this chunk's own concatenation
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
        params = self._stacked([job.params.flat for job in jobs])
        optimizer = self._state(params)
        total_loss = torch.zeros(k, device=device)
        steps = [job.steps for job in jobs]
        # Every job's batches as rows of one [K, steps, batch] index tensor, -1 past a short
        # batch's end and past a job's last step. A pass's batches are its permutation cut into
        # batch-size pieces with only the last one short, so a pass fills its steps' flattened
        # slots from the start: one slice assignment per pass, no tensor per batch.
        size = config.batch_size
        table = torch.full((k, steps[0], size), -1, dtype=torch.int64)
        flat = table.view(k, -1)
        samples = [0] * k
        for j, (job, passes) in enumerate(zip(jobs, batches, strict=True)):
            per_pass = -(-len(job.data) // size)
            for p, order in enumerate(passes):
                take = min(len(order), (job.steps - p * per_pass) * size)
                flat[j, p * per_pass * size:p * per_pass * size + take] = order[:take]
                samples[j] += take
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
        trained = self._returned(params)
        loss = total_loss.to("cpu")
        # each result is a row of the chunk's tensor (no copy per model; the chunk lives while any row does)
        return [TrainResult(Params(trained[j], self.layout), samples[j], steps[j], float(loss[j]) / steps[j])
                for j in range(k)]

    def _stacked(self, flats: list[torch.Tensor]) -> torch.Tensor:
        """The models as one K x P tensor on the device: stacked where they are (on the GPU when the
        simulator keeps them there), else through pinned memory, so the copy to the GPU is one DMA."""
        if self.device.type == "cpu" or flats[0].device == self.device:
            return torch.stack([f.to(self.device) for f in flats])
        staging = torch.empty((len(flats), flats[0].numel()), dtype=flats[0].dtype, pin_memory=True)
        torch.stack(flats, out=staging)
        return staging.to(self.device, non_blocking=True)

    def _returned(self, params: torch.Tensor) -> torch.Tensor:
        """The trained stack where results live: the device when params stay there, else the CPU."""
        if params.device == self.params_device:
            return params
        out = torch.empty(params.shape, dtype=params.dtype, pin_memory=params.device.type == "cuda")
        out.copy_(params)
        return out

    @torch.no_grad()
    def evaluate_many(self, models: list[Params], data: Dataset) -> list[Evaluation]:
        """Every model on one dataset (the global test set), as `TorchLearner.evaluate` would give
        each: models stacked, one vmapped forward per slice of the data and chunk of models."""
        if not models:
            return []
        if len(data) == 0:
            return [Evaluation(float("nan"), float("nan"), 0) for _ in models]
        x, y = self._tensors(data)
        per_model = EVAL_BATCH * _activation_elements(self.module, self.feature_shape) + self.layout.numel
        size = max(1, min(len(models), self.chunk_elements // per_model))
        results: list[Evaluation] = []
        for start in range(0, len(models), size):
            chunk = models[start:start + size]
            stacked = self._stacked([m.flat for m in chunk])
            named = self._views(stacked, len(chunk))
            correct = torch.zeros(len(chunk), dtype=torch.int64, device=self.device)
            loss_sum = torch.zeros(len(chunk), dtype=torch.float64, device=self.device)
            for begin in range(0, len(data), EVAL_BATCH):  # the slices TorchLearner.evaluate sums over
                logits = self._forward(named, x[begin:begin + EVAL_BATCH])
                target = y[begin:begin + EVAL_BATCH]
                losses = F.cross_entropy(logits.transpose(1, 2), target.expand(len(chunk), -1), reduction="none")
                loss_sum += losses.sum(1).double()
                correct += (logits.argmax(2) == target).sum(1)
            n = len(data)
            results.extend(Evaluation(int(c) / n, float(s) / n, n) for c, s in zip(correct.cpu(), loss_sum.cpu(), strict=True))
        return results

    @torch.no_grad()
    def evaluate_each(self, pairs: list[tuple[Params, Dataset]]) -> list[Evaluation]:
        """Model i on dataset i (every peer's model on its own local test split): the splits are
        padded to the longest and masked, one vmapped forward per chunk of models."""
        results: list[Evaluation] = [Evaluation(float("nan"), float("nan"), 0) for _ in pairs]
        busy = [i for i, (_, data) in enumerate(pairs) if len(data)]
        if not busy:
            return results
        longest = max(len(pairs[i][1]) for i in busy)
        per_model = longest * (_activation_elements(self.module, self.feature_shape) + 2) + self.layout.numel
        size = max(1, self.chunk_elements // per_model)
        for start in range(0, len(busy), size):
            chunk = busy[start:start + size]
            k = len(chunk)
            x = torch.zeros((k, longest, *self.feature_shape), dtype=torch.float32)
            y = torch.zeros((k, longest), dtype=torch.int64)
            mask = torch.zeros((k, longest), dtype=torch.bool)
            for j, i in enumerate(chunk):
                data = pairs[i][1]
                x[j, :len(data)], y[j, :len(data)], mask[j, :len(data)] = data.x, data.y, True
            x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
            named = self._views(self._stacked([pairs[i][0].flat for i in chunk]), k)
            logits = self._forward_each(named, x)
            losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none") * mask
            correct = ((logits.argmax(2) == y) & mask).sum(1).cpu()
            loss_sum = losses.sum(1).double().cpu()
            for j, i in enumerate(chunk):
                n = len(pairs[i][1])
                results[i] = Evaluation(int(correct[j]) / n, float(loss_sum[j]) / n, n)
        return results

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
