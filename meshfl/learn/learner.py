"""Learners turn (Params, local data) into trained Params and evaluation numbers.

`TorchLearner` keeps one module whose parameters are views into a flat buffer, so loading
a peer's Params is one copy and reading them back is one clone. One learner serves every
peer of a simulation in turn: per-peer state is only Params, data and a generator (and, with
`train.buffers: local`, the peer's own batch-norm buffers, which the peer's context keeps and
joins to the parameters it trains or evaluates: `with_buffers` / `split`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from meshfl.config import TrainConfig
from meshfl.core.context import TrainResult
from meshfl.core.params import Layout, Params, bind_flat
from meshfl.data import Dataset
from meshfl.learn.models import build_model, is_user_model, resolve_function

EVAL_BATCH = 4096


@dataclass(frozen=True)
class Evaluation:
    """What a learner's `evaluate` gives back.

    Attributes
    ----------
    accuracy : float
        Fraction of samples classified right (NaN for no data).
    loss : float
        Mean loss per sample (NaN for no data).
    samples : int
        Samples evaluated.
    metrics : dict[str, float]
        The `train.metrics`, by name.
    """

    accuracy: float
    loss: float
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    """`train.metrics`, by name, computed over the whole split at once."""


class Learner(Protocol):
    """What the runtimes ask of a learner.

    `TorchLearner`, or an adapter of `meshfl.learn.adapters` (`make_learner` picks one from what
    `train.model` builds).

    Attributes
    ----------
    layout : Layout
        What travels and is aggregated.
    feature_shape : tuple[int, ...]
        The shape of one sample.
    num_classes : int
        Output classes.
    device : torch.device
        Where training runs.
    params_device : torch.device
        Where the Params the learner makes live.
    local_buffers : bool
        Whether each peer keeps its own buffers (`train.buffers: local`).
    """

    layout: Layout
    feature_shape: tuple[int, ...]
    num_classes: int
    device: torch.device
    params_device: torch.device
    local_buffers: bool

    def keep_params_on_device(self) -> None:
        """Make the Params this learner makes live on its `device` (the simulator keeps every model on the GPU)."""
        ...

    def init_params(self, seed: int) -> Params:
        """The initial model that `seed` gives, in `layout`."""
        ...

    def steps_for(self, samples: int, *, epochs: int | None = None, steps: int | None = None) -> int:
        """Mini-batch steps of one training request on `samples` samples (see `steps_per_round`)."""
        ...

    def train(self, params: Params, data: Dataset, generator: torch.Generator, steps: int) -> TrainResult:
        """Train `steps` mini-batch steps from `params` on `data`, batches drawn from `generator`."""
        ...

    def evaluate(self, params: Params, data: Dataset) -> Evaluation:
        """Evaluate `params` on `data`."""
        ...


def steps_per_round(config: TrainConfig, samples: int, *, epochs: int | None = None, steps: int | None = None) -> int:
    """Count the mini-batch steps of one training request.

    Parameters
    ----------
    config : TrainConfig
        The train config: its `local_steps`, else `local_epochs`, is the default, and its `batch_size`.
    samples : int
        Local training samples.
    epochs : int, optional
        Full passes over the data (rounded up to whole batches).
    steps : int, optional
        Mini-batch steps, taken as they are.

    Returns
    -------
    int
        The steps.

    Raises
    ------
    ValueError
        If both `epochs` and `steps` are given, or either is negative.
    """
    if epochs is not None and steps is not None:
        raise ValueError("ctx.train: give epochs or steps, not both")
    if steps is not None:
        if steps < 0:
            raise ValueError(f"ctx.train: steps must be >= 0, got {steps}")
        return steps
    if epochs is None and config.local_steps is not None:
        return config.local_steps
    epochs = config.local_epochs if epochs is None else epochs
    if epochs < 0:
        raise ValueError(f"ctx.train: epochs must be >= 0, got {epochs}")
    return epochs * math.ceil(samples / config.batch_size)


def batch_indices(samples: int, steps: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Draw the index batches of `steps` mini-batches, reshuffling at each pass over the data.

    Parameters
    ----------
    samples : int
        Samples in the data.
    steps : int
        Batches wanted.
    batch_size : int
        Indices per batch (the last batch of a pass may be shorter).
    generator : torch.Generator
        Where the shuffles come from.

    Returns
    -------
    list[torch.Tensor]
        `steps` tensors of indices.
    """
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(samples, generator=generator)
        batches.extend(order.split(batch_size))
    return batches[:steps]


def resolve_device(name: str) -> torch.device:
    """Turn `train.device` into a torch device: auto is cuda when a GPU is there, else cpu.

    Raises
    ------
    ValueError
        If `name` is cuda and no CUDA device is available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())  # with its index: tensors report cuda:0, not cuda
    return torch.device(name)


class TorchLearner:
    """The learner for a torch module: one module whose parameters are views into a flat buffer.

    Parameters
    ----------
    config : TrainConfig
        The train config (model, optimizer, loss, step, metrics, device, buffers).
    feature_shape : tuple[int, ...]
        The shape of one sample.
    num_classes : int
        Output classes.
    module : torch.nn.Module, optional
        A module already built from `config.model`; else it is built here.

    Raises
    ------
    ValueError
        If `train.device` is cuda and no CUDA device is available.
    ModelError
        If the model or a user function (`train.loss`, `train.step`, `train.metrics`) cannot be had.
    """

    def __init__(self, config: TrainConfig, feature_shape: tuple[int, ...], num_classes: int,
                 module: torch.nn.Module | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.feature_shape = feature_shape
        self.num_classes = num_classes
        if module is None:  # else one `make_learner` built already (it looked at its type)
            module = build_model(config.model, feature_shape, num_classes, config.model_options)
        self.module = module.to(self.device)
        self.module_layout = Layout.of_module(self.module, buffers=True)
        """Parameters then float buffers: what `train` and `evaluate` take and give, and what a saved model holds."""
        self.flat = bind_flat(self.module, buffers=True)
        parameters = Layout.of_module(self.module, buffers=False)
        self.local_buffers = config.buffers == "local" and parameters.numel < self.module_layout.numel
        """True when each peer keeps its own buffers (`train.buffers: local` and a model that has some)."""
        self.layout = parameters if self.local_buffers else self.module_layout
        """What travels and is aggregated: the module layout, or only the parameters when buffers stay local."""
        self.buffer_layout = Layout(self.module_layout.names[len(parameters.names):],
                                    self.module_layout.shapes[len(parameters.names):])
        """The float buffers alone (empty for a model without any)."""
        self._user_model = is_user_model(config.model)
        # the user's own code, imported here, on the machine that runs the peer (errors name the field)
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = (
            None if config.loss == "cross_entropy" else resolve_function(config.loss, "train.loss"))
        self.metric_fns = {name: resolve_function(ref, f"train.metrics.{name}") for name, ref in config.metrics.items()}
        self.step_fn: Callable[..., object] | None = None
        if config.step is not None:
            self.step_fn = resolve_function(config.step, "train.step")
        elif config.fedprox_mu > 0:
            from meshfl.learn.steps import fedprox

            self.step_fn = fedprox
        self._user_code = config.step is not None or self.loss_fn is not None
        self._on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.params_device = torch.device("cpu")
        self._initial: dict[int, Params] = {}
        """Where the Params this learner makes live: cpu (what the wire and the stores take), or its own
        device when the simulator keeps every model on the GPU (`keep_params_on_device`)."""

    def keep_params_on_device(self) -> None:
        """Make the Params this learner makes live on its `device` (the simulator keeps every model on the GPU)."""
        self.params_device = self.device

    def init_params(self, seed: int) -> Params:
        """The model a seed initialises, in the travelling `layout`.

        A fresh copy each call: every simulated peer starts from the run's one initial model, and
        building a module per peer cost 10,000 peers 17 s.
        """
        made = self._initial_model(seed)
        return Params(made.flat[:self.layout.numel].to(self.params_device, copy=True), self.layout)

    def init_buffers(self, seed: int) -> Params:
        """The float buffers of the model a seed initialises (`buffer_layout`).

        A peer's own buffers before it has trained, with `train.buffers: local`.
        """
        made = self._initial_model(seed)
        return Params(made.flat[self.layout.numel:].to(self.params_device, copy=True), self.buffer_layout)

    def _initial_model(self, seed: int) -> Params:
        made = self._initial.get(seed)
        if made is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fresh = build_model(self.config.model, self.feature_shape, self.num_classes, self.config.model_options)
            made = self._initial[seed] = Params.from_module(fresh, buffers=True)
            if len(self._initial) > 8:
                self._initial.pop(next(iter(self._initial)))
        return made

    def with_buffers(self, params: Params, buffers: Params) -> Params:
        """Join `params` (the travelling layout) and a peer's own `buffers` into one model of `module_layout`.

        Parameters
        ----------
        params : Params
            Parameters only (`layout`, with `train.buffers: local`).
        buffers : Params
            The peer's float buffers (`buffer_layout`).

        Returns
        -------
        Params
            What `train` and `evaluate` take.

        Raises
        ------
        ValueError
            If `params` or `buffers` does not have this learner's layouts.
        """
        if params.layout.fingerprint != self.layout.fingerprint or buffers.layout.fingerprint != self.buffer_layout.fingerprint:
            raise ValueError("with_buffers: params or buffers do not have this learner's layouts")
        return Params(torch.cat([params.flat, buffers.flat.to(params.flat.device)]), self.module_layout)

    def split(self, model: Params) -> tuple[Params, Params]:
        """Split a model of `module_layout` into (parameters in `layout`, buffers in `buffer_layout`).

        The inverse of `with_buffers`.

        Raises
        ------
        ValueError
            If the model does not have this learner's module layout.
        """
        if model.layout.fingerprint != self.module_layout.fingerprint:
            raise ValueError("split: the model does not have this learner's module layout")
        n = self.layout.numel
        return Params(model.flat[:n].clone(), self.layout), Params(model.flat[n:].clone(), self.buffer_layout)

    def _load(self, params: Params) -> None:
        if params.flat.numel() != self.flat.numel():
            raise ValueError(f"learner: a model of {params.flat.numel()} values for a module of {self.flat.numel()} "
                             "(with train.buffers=local, join the peer's buffers first: with_buffers)")
        self.flat.copy_(params.flat)

    def _tensors(self, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return data.x, data.y
        key = id(data)
        if key not in self._on_device:
            self._on_device[key] = (data.x.to(self.device), data.y.to(self.device))
        return self._on_device[key]

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.config.optimizer == "adam":
            return torch.optim.Adam(self.module.parameters(), lr=self.config.learning_rate)
        return torch.optim.SGD(self.module.parameters(), lr=self.config.learning_rate, momentum=self.config.momentum)

    def steps_for(self, samples: int, *, epochs: int | None = None, steps: int | None = None) -> int:
        """Mini-batch steps of one training request on `samples` samples (see `steps_per_round`)."""
        return steps_per_round(self.config, samples, epochs=epochs, steps=steps)

    def train(self, params: Params, data: Dataset, generator: torch.Generator, steps: int) -> TrainResult:
        """Train `steps` mini-batch steps from `params` (a training request is a piece of work, not a round).

        Parameters
        ----------
        params : Params
            Where training starts, in `module_layout` (join a peer's buffers first with `with_buffers`).
        data : Dataset
            The peer's training data.
        generator : torch.Generator
            The peer's stream: batches, and the seed of a user model's or user code's random draws.
        steps : int
            Mini-batch steps.

        Returns
        -------
        TrainResult
            The trained model (`module_layout`), samples, steps and mean loss; `params` itself with
            0 samples and NaN loss when there is no data or no step.

        Raises
        ------
        ValueError
            If `params` does not fit the module.
        """
        if len(data) == 0 or steps == 0:
            return TrainResult(params, 0, 0, float("nan"))
        train = self._train if self.step_fn is None else self._train_step
        if self._user_model:  # dropout and other random layers draw from the peer's own stream, not torch's global one
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                return train(params, data, generator, steps)
        if self._user_code:  # a user loss or step may draw from torch's global generator too: seed it from the
            # peer's stream without advancing it, so the batches stay those of meshfl's own loop
            seed = int.from_bytes(hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest(), "little")
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed >> 2)
                return train(params, data, generator, steps)
        return train(params, data, generator, steps)

    def _train_step(self, params: Params, data: Dataset, generator: torch.Generator, steps: int) -> TrainResult:
        """A training step function (`train.step`, or FedProx) over the batches the default loop would use."""
        assert self.step_fn is not None
        self._load(params)
        x, y = self._tensors(data)
        indices = batch_indices(len(data), steps, self.config.batch_size, generator)
        taken = [0, 0]  # steps, samples

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in indices:
                idx = idx.to(self.device)
                taken[0] += 1
                taken[1] += len(idx)
                yield x[idx], y[idx]

        given = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        self.module.train()
        mean_loss = self.step_fn(self.module, batches(), optimizer=self._optimizer(), loss=self.loss_fn or F.cross_entropy,
                                 global_params=given, config=self.config)
        trained = Params(self.flat.detach().to(self.params_device, copy=True), self.module_layout)
        return TrainResult(trained, taken[1], taken[0], float("nan") if mean_loss is None else float(mean_loss))

    def _train(self, params: Params, data: Dataset, generator: torch.Generator, steps: int) -> TrainResult:
        self._load(params)
        x, y = self._tensors(data)
        optimizer = self._optimizer()
        self.module.train()
        total_loss = torch.zeros((), device=self.device)
        samples = 0
        for idx in batch_indices(len(data), steps, self.config.batch_size, generator):
            idx = idx.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            loss = (self.loss_fn or F.cross_entropy)(self.module(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
            samples += len(idx)
        trained = Params(self.flat.detach().to(self.params_device, copy=True), self.module_layout)
        return TrainResult(trained, samples, steps, float(total_loss) / steps)

    @torch.no_grad()
    def evaluate(self, params: Params, data: Dataset) -> Evaluation:
        """Evaluate `params` (in `module_layout`) on `data`: accuracy, mean loss and `train.metrics`.

        Returns
        -------
        Evaluation
            NaN values and 0 samples when `data` is empty.

        Raises
        ------
        ValueError
            If `params` does not fit the module.
        """
        if len(data) == 0:
            return Evaluation(float("nan"), float("nan"), 0, dict.fromkeys(self.metric_fns, float("nan")))
        self._load(params)
        self.module.eval()  # safe: torch evaluation mode, not Python eval
        x, y = self._tensors(data)
        correct = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        outputs: list[torch.Tensor] = []
        for start in range(0, len(data), EVAL_BATCH):
            logits = self.module(x[start:start + EVAL_BATCH])
            target = y[start:start + EVAL_BATCH]
            if self.loss_fn is None:
                loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
            else:  # a user loss is a mean over its batch
                loss_sum += self.loss_fn(logits, target).detach().double() * len(target)
            correct += int((logits.argmax(1) == target).sum())
            if self.metric_fns:
                outputs.append(logits)
        metrics: dict[str, float] = {}
        if self.metric_fns:
            logits = torch.cat(outputs)
            metrics = {name: float(fn(logits, y)) for name, fn in self.metric_fns.items()}
        return Evaluation(correct / len(data), float(loss_sum) / len(data), len(data), metrics)
