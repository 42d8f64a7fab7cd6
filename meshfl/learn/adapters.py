"""Learners for models of other frameworks: PyTorch Lightning modules and Keras 3 models.

`make_learner` builds `train.model` once and picks the learner by what it got:

- a `LightningModule` (from `pytorch_lightning` or `lightning.pytorch`): `LightningLearner`, which
  trains it with its own `configure_optimizers` and `training_step` in a loop of its own (no
  `Trainer`; see the class for the hooks it honours);
- a Keras 3 `keras.Model` on the torch backend, compiled in the factory: `KerasLearner`, which
  trains it with `train_on_batch` (its compiled loss and optimiser, and its own `train_step` if
  it overrides one);
- any other `torch.nn.Module`: `TorchLearner`, as before.

Every learner takes its mini-batches from the peer's own torch generator (the indices
`batch_indices` draws, so the batches are those meshfl's own loop would use) and runs the
framework's random draws (dropout) from generators seeded off that stream: a simulated run is a
pure function of its seed. Both frameworks are optional extras (`pip install 'meshfl[lightning]'`,
`'meshfl[keras]'`); nothing here imports them until a model needs them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meshfl.config import TrainConfig
from meshfl.core.context import TrainResult
from meshfl.core.params import Layout, Params
from meshfl.data import Dataset
from meshfl.learn.learner import EVAL_BATCH, Evaluation, Learner, TorchLearner, batch_indices, steps_per_round
from meshfl.learn.models import ModelError, build_model, is_keras_model, is_user_model, resolve_function

LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
INSTALL_LIGHTNING = "pip install 'meshfl[lightning]' (pytorch-lightning)"
INSTALL_KERAS = "pip install 'meshfl[keras]' (keras 3)"


# -- detection -------------------------------------------------------------------------------

def lightning_base(obj: Any) -> type | None:
    """The `LightningModule` class `obj` is an instance of (from whichever Lightning package defines it).

    Parameters
    ----------
    obj : object
        What a `train.model` factory returned.

    Returns
    -------
    type or None
        `lightning.pytorch.LightningModule` or `pytorch_lightning.LightningModule`; None if neither
        (a package that was never imported cannot have made `obj`).
    """
    for name in LIGHTNING_PACKAGES:
        package = sys.modules.get(name)
        base = getattr(package, "LightningModule", None) if package is not None else None
        if base is not None and isinstance(obj, base):
            return base
    return None


def check_keras_backend() -> None:
    """Check that the imported keras runs on the torch backend.

    Raises
    ------
    ModelError
        One line naming `train.model` and saying to set ``KERAS_BACKEND=torch``.
    """
    import keras

    backend = keras.backend.backend()
    if backend != "torch":
        raise ModelError(f"train.model: keras was imported with the {backend!r} backend; meshfl trains Keras models on "
                         "the torch backend: set KERAS_BACKEND=torch before keras is first imported (meshfl sets it "
                         "when it imports your factory's module first)")


def make_learner(config: TrainConfig, feature_shape: tuple[int, ...], num_classes: int) -> Learner:
    """Make the learner for `train.model`: built once here, its type picks the learner class.

    `TorchLearner`, `LightningLearner` or `KerasLearner`.

    Parameters
    ----------
    config : TrainConfig
        The run's train section.
    feature_shape : tuple of int
        One sample's shape.
    num_classes : int
        Classes of the dataset.

    Returns
    -------
    Learner
        The learner, holding the model built here.

    Raises
    ------
    ModelError
        One line naming `train.model` (or the field that does not apply to the model's framework).
    """
    if not is_user_model(config.model):
        return TorchLearner(config, feature_shape, num_classes)
    built = build_model(config.model, feature_shape, num_classes, config.model_options)
    if is_keras_model(built):
        return KerasLearner(config, feature_shape, num_classes, model=built)
    if lightning_base(built) is not None:
        return LightningLearner(config, feature_shape, num_classes, module=built)
    return TorchLearner(config, feature_shape, num_classes, module=built)


def layout_of(module: Any) -> Layout:
    """The Params layout of a model of any supported framework.

    Parameters
    ----------
    module : torch.nn.Module or keras.Model
        A torch or Lightning module (parameters, then float buffers, by name) or a Keras model
        (float weights by variable path).

    Returns
    -------
    Layout
        What that model's Params hold.
    """
    if is_keras_model(module):
        return Layout(*zip(*[(name, tuple(v.shape)) for name, v in _keras_weights(module)], strict=True))
    return Layout.of_module(module, buffers=True)


def load_into(module: Any, params: Params) -> None:
    """Copy `params` into a model of any supported framework.

    Parameters
    ----------
    module : torch.nn.Module or keras.Model
        The model; its `layout_of` must equal `params.layout`.
    params : Params
        The values, e.g. a peer's final model.
    """
    if is_keras_model(module):
        for name, variable in _keras_weights(module):
            variable.assign(params.tensor(name).to(variable.value.device))
    else:
        params.to_module(module)


def _refuse_torch_fields(config: TrainConfig, framework: str, own: str) -> None:
    """ModelError for the fields of meshfl's own torch loop, which a framework model replaces with its own."""
    for field, set_ in (("train.loss", config.loss != "cross_entropy"), ("train.step", config.step is not None),
                        ("train.fedprox_mu", config.fedprox_mu > 0)):
        if set_:
            raise ModelError(f"{field}: does not apply to a {framework} model, which trains with its own {own}; "
                             f"put it there (or use a torch.nn.Module factory)")


def _peer_seed(generator: torch.Generator) -> int:
    """One draw from the peer's stream: the seed of the framework's random draws in one training request."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


# -- PyTorch Lightning ------------------------------------------------------------------------

class _Fabric:
    """The little of `lightning.Fabric` a `LightningModule` asks of its `fabric` (`module.fabric = ...`).

    Backward (for `manual_backward` and the `backward` hook), `log_dict` (what `self.log` reaches),
    the optimisers and schedulers of the current training request (`self.optimizers()`,
    `self.lr_schedulers()`).
    """

    def __init__(self) -> None:
        self.logged: dict[str, Any] = {}
        """The last value of each name the module logged with `self.log` / `self.log_dict`."""
        self.lr_scheduler_configs: list[_SchedulerConfig] = []
        self.current_epoch = 0
        self.global_step = 0

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward(*args, **kwargs)

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for name, value in metrics.items():
            self.logged[name] = value.detach() if isinstance(value, torch.Tensor) else value

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        self.log_dict({name: value})


class _SchedulerConfig:
    def __init__(self, scheduler: Any, interval: str = "epoch", frequency: int = 1, monitor: str | None = None) -> None:
        if interval not in ("step", "epoch"):
            raise ModelError(f"train.model: configure_optimizers: lr_scheduler interval must be 'step' or 'epoch' (got {interval!r})")
        self.scheduler, self.interval, self.frequency, self.monitor = scheduler, interval, max(int(frequency), 1), monitor


def _optimizers_of(conf: Any) -> tuple[list[torch.optim.Optimizer], list[_SchedulerConfig]]:
    """Read what `configure_optimizers` returned, in the forms Lightning accepts.

    An optimiser, a list of them, (optimisers, schedulers), a dict with `optimizer` (and `lr_scheduler`: a scheduler or a dict with
    `scheduler`, `interval`, `frequency`, `monitor`), or a list of such dicts.
    """
    def scheduler(item: Any, monitor: str | None = None) -> _SchedulerConfig:
        if isinstance(item, Mapping):
            return _SchedulerConfig(item["scheduler"], item.get("interval", "epoch"), item.get("frequency", 1),
                                    item.get("monitor", monitor))
        return _SchedulerConfig(item, monitor=monitor)

    if conf is None:
        return [], []
    if isinstance(conf, torch.optim.Optimizer):
        return [conf], []
    if isinstance(conf, Mapping):
        conf = [conf]
    if isinstance(conf, (list, tuple)):
        if len(conf) == 2 and isinstance(conf[0], (list, tuple)):
            schedulers = conf[1] if isinstance(conf[1], (list, tuple)) else [conf[1]]
            return list(conf[0]), [scheduler(s) for s in schedulers]
        if all(isinstance(c, Mapping) for c in conf):
            optimizers = [c["optimizer"] for c in conf]
            schedulers = [scheduler(c["lr_scheduler"], c.get("monitor")) for c in conf if c.get("lr_scheduler") is not None]
            return optimizers, schedulers
        if all(isinstance(c, torch.optim.Optimizer) for c in conf):
            return list(conf), []
    raise ModelError(f"train.model: configure_optimizers returned a {type(conf).__name__} meshfl does not read; "
                     "return an optimizer, a list of them, (optimizers, schedulers) or a dict with 'optimizer'")


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss a `training_step` returned: a tensor, a mapping's `loss`, or None (skip the step)."""
    if output is None or isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise ModelError(f"train.model: training_step returned a {type(output).__name__}; Lightning's contract is a loss "
                     "tensor, a dict with 'loss', or None")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    with warnings.catch_warnings():  # hooks called outside a Trainer; meshfl knows
        warnings.filterwarnings("ignore", message=".*Trainer.*")
        yield


class LightningLearner(TorchLearner):
    """Trains a `LightningModule` with its own `configure_optimizers` and `training_step`, without a `Trainer`.

    The module is a `torch.nn.Module`, so its parameters and floating-point buffers are bound to
    one flat buffer and map to Params by name exactly as `TorchLearner` does. A training request
    of `steps` mini-batches (drawn from the peer's generator) runs Lightning's automatic
    optimisation: for each batch, inside the optimiser closure, `training_step(batch,
    batch_idx)` (batch = ``[x, y]``, as a DataLoader of a TensorDataset gives it), then
    `optimizer_zero_grad`, `on_before_backward`, `backward`, `on_after_backward`,
    `on_before_optimizer_step`; the closure goes to `optimizer_step` (default
    ``optimizer.step(closure)``). With ``automatic_optimization = False`` the
    `training_step` does its own work through `self.optimizers()`, `self.manual_backward`
    and `self.lr_schedulers()`. Also honoured: `on_train_batch_start` (returning -1 ends the
    request), `on_train_batch_end`, learning-rate schedulers with interval `step` or `epoch`
    (one pass over the peer's data) and their frequency, stepped through
    `lr_scheduler_step`; `self.log` / `self.log_dict` are accepted (the last values are
    in `logged`; they do not reach meshfl's metrics). `configure_optimizers` is called
    afresh for each request: like meshfl's own loop, a peer carries only its Params from one
    request to the next (no optimiser state).

    Evaluation: accuracy is the argmax of `forward`; the loss is what `validation_step` (or,
    without one, `test_step`) returns or logs under a name holding "loss", averaged over
    batches by size; with neither, cross-entropy of `forward`'s output. `train.metrics`
    are computed on `forward`'s output.

    Not honoured (a `Trainer`'s business): callbacks, Trainer flags (gradient clipping,
    accumulation, precision, max_epochs), `setup`/`teardown`/`configure_model`,
    `prepare_data` and the `*_dataloader` hooks (meshfl supplies the batches), the epoch,
    fit and validation-loop hooks (`on_train_epoch_*`, `on_fit_*`, `on_validation_*`),
    `transfer_batch_to_device`, checkpoint hooks, `predict_step`, and `train.optimizer`,
    `learning_rate`, `momentum` (the module's own optimiser rules). `train.loss`,
    `train.step` and `train.fedprox_mu` are refused (ModelError naming the field).

    Parameters
    ----------
    config : TrainConfig
        The run's train section (`model` names the factory that built `module`).
    feature_shape : tuple of int
        One sample's shape.
    num_classes : int
        Classes of the dataset.
    module : LightningModule
        The module the factory returned; this learner trains it for every peer in turn.
    """

    def __init__(self, config: TrainConfig, feature_shape: tuple[int, ...], num_classes: int, module: torch.nn.Module) -> None:
        _refuse_torch_fields(config, "LightningModule", "training_step and configure_optimizers")
        base = lightning_base(module)
        if base is None:
            raise ModelError(f"train.model: {config.model!r} did not return a LightningModule")
        super().__init__(config, feature_shape, num_classes, module=module)
        self.fabric = _Fabric()
        self.module.fabric = self.fabric  # what `manual_backward`, `self.log`, `self.optimizers()` reach
        kind = type(self.module)
        self._eval_step = next((getattr(self.module, name) for name in ("validation_step", "test_step")
                                if getattr(kind, name) is not getattr(base, name)), None)

    @property
    def logged(self) -> dict[str, Any]:
        """What the module last logged with `self.log` / `self.log_dict`, by name."""
        return self.fabric.logged

    def _train(self, params: Params, data: Dataset, generator: torch.Generator, steps: int) -> TrainResult:
        self.flat.copy_(params.flat)
        x, y = self._tensors(data)
        module, fabric = self.module, self.fabric
        optimizers, schedulers = _optimizers_of(module.configure_optimizers())
        automatic = module.automatic_optimization
        if automatic and len(optimizers) != 1:
            raise ModelError(f"train.model: automatic optimisation takes one optimizer, configure_optimizers gave "
                             f"{len(optimizers)}; set `self.automatic_optimization = False` for several")
        module._fabric_optimizers = optimizers  # `self.optimizers()` under a fabric
        fabric.lr_scheduler_configs = schedulers
        per_pass = math.ceil(len(data) / self.config.batch_size)
        module.train()
        losses: list[torch.Tensor] = []
        samples = taken = 0
        with _quiet_lightning():
            for i, idx in enumerate(batch_indices(len(data), steps, self.config.batch_size, generator)):
                epoch, batch_idx = divmod(i, per_pass)
                fabric.current_epoch, fabric.global_step = epoch, i
                idx = idx.to(self.device)
                batch = [x[idx], y[idx]]
                if module.on_train_batch_start(batch, batch_idx) == -1:
                    break
                if automatic:
                    output = self._automatic_step(optimizers[0], batch, batch_idx, epoch)
                else:
                    output = module.training_step(batch, batch_idx)
                loss = _loss_of(output)
                if loss is not None:
                    losses.append(loss.detach())
                module.on_train_batch_end(output, batch, batch_idx)
                samples += len(idx)
                taken += 1
                last_of_pass = batch_idx == per_pass - 1
                for config in schedulers:
                    count = taken if config.interval == "step" else epoch + 1
                    if (config.interval == "step" or last_of_pass) and count % config.frequency == 0:
                        metric = fabric.logged.get(config.monitor) if config.monitor else None
                        if config.monitor is None or metric is not None:
                            module.lr_scheduler_step(config.scheduler, metric)
        trained = Params(self.flat.detach().to(self.params_device, copy=True), self.layout)
        mean = float(torch.stack(losses).float().mean()) if losses else float("nan")
        return TrainResult(trained, samples, taken, mean)

    def _automatic_step(self, optimizer: torch.optim.Optimizer, batch: list[torch.Tensor], batch_idx: int, epoch: int) -> Any:
        """One step of Lightning's automatic optimisation; returns what `training_step` returned."""
        module = self.module
        outputs: list[Any] = []

        def closure() -> torch.Tensor | None:
            output = module.training_step(batch, batch_idx)
            outputs.append(output)
            loss = _loss_of(output)
            module.optimizer_zero_grad(epoch, batch_idx, optimizer)
            if loss is not None:
                module.on_before_backward(loss)
                module.backward(loss)
                module.on_after_backward()
            module.on_before_optimizer_step(optimizer)
            return loss

        module.optimizer_step(epoch, batch_idx, optimizer, closure)
        return outputs[-1] if outputs else None

    @torch.no_grad()
    def evaluate(self, params: Params, data: Dataset) -> Evaluation:
        """Evaluate `params` on `data` (see the class docstring: loss from `validation_step` or `test_step`).

        Without either step it is `TorchLearner.evaluate`. NaN values and 0 samples when `data` is empty.
        """
        if self._eval_step is None:
            return super().evaluate(params, data)
        if len(data) == 0:
            return Evaluation(float("nan"), float("nan"), 0, dict.fromkeys(self.metric_fns, float("nan")))
        self.flat.copy_(params.flat)
        self.module.eval()  # safe: torch evaluation mode, not Python eval
        x, y = self._tensors(data)
        correct, loss_sum, outputs = 0, 0.0, []
        with _quiet_lightning():
            for batch_idx, start in enumerate(range(0, len(data), EVAL_BATCH)):
                xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
                logits = self.module(xb)
                correct += int((logits.argmax(1) == yb).sum())
                if self.metric_fns:
                    outputs.append(logits)
                self.fabric.logged = {}
                loss = self._eval_loss(self._eval_step([xb, yb], batch_idx), self.fabric.logged)
                loss_sum += (float(F.cross_entropy(logits, yb)) if loss is None else float(loss)) * len(yb)
        metrics: dict[str, float] = {}
        if self.metric_fns:
            logits = torch.cat(outputs)
            metrics = {name: float(fn(logits, y)) for name, fn in self.metric_fns.items()}
        return Evaluation(correct / len(data), loss_sum / len(data), len(data), metrics)

    @staticmethod
    def _eval_loss(output: Any, logged: Mapping[str, Any]) -> Any:
        """The loss of a `validation_step`/`test_step`: its scalar result, its mapping's loss, or the one loss it logged."""
        if isinstance(output, torch.Tensor) and output.numel() == 1:
            return output
        if isinstance(output, Mapping):
            for key in ("loss", "val_loss", "test_loss"):
                if key in output:
                    return output[key]
        losses = [v for k, v in logged.items() if "loss" in k]
        return losses[0] if len(losses) == 1 else None


# -- Keras 3 (torch backend) ------------------------------------------------------------------

def _keras_weights(model: Any) -> list[tuple[str, Any]]:
    """A Keras model's floating-point weights (trainable, then batch-norm statistics and the like), by variable path."""
    named = [(v.path, v) for v in model.weights if "float" in str(v.dtype)]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ModelError(f"train.model: two Keras variables share the path {duplicate!r}; give the layers distinct names")
    return named


@contextlib.contextmanager
def keras_build_scope(seed: int | None = None) -> Iterator[None]:
    """Where a factory builds a Keras model.

    Layer names are counted from scratch (so every build of one factory names its variables
    alike, in any process); with `seed`, every random draw of the build (Python, NumPy, torch and
    Keras's global seed generator) is seeded. All of it is restored afterwards.

    Parameters
    ----------
    seed : int, optional
        Seed of the build's random draws (the initial weights); None leaves them alone.
    """
    import random  # noqa: TID251 - saved and restored around keras's own seeding, never drawn from here

    from keras.src.backend.common import global_state

    names = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", None)
    saved = None
    if seed is not None:
        saved = (random.getstate(), np.random.get_state(), global_state.get_global_attribute("global_random_seed"),
                 global_state.get_global_attribute("global_seed_generator"))
    try:
        if seed is None:
            yield
        else:
            import keras

            with torch.random.fork_rng(devices=[]):
                keras.utils.set_random_seed(seed % 2**32)
                yield
    finally:
        global_state.set_global_attribute("object_name_uids", names)
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            global_state.set_global_attribute("global_random_seed", saved[2])
            global_state.set_global_attribute("global_seed_generator", saved[3])


class KerasLearner:
    """Trains a compiled Keras 3 model (torch backend) with its own compiled loss and optimiser.

    Params hold the model's floating-point `weights` (trainable ones and statistics such as
    batch norm's moving mean and variance), named by variable path (``sequential/dense/kernel``;
    layer names are counted afresh for each build, so every build of one factory agrees).
    A training request loads them, resets the optimiser's variables to their freshly built
    values (its step count and moments: a peer carries only its Params between requests, as in
    meshfl's own loop), seeds the model's seed generators and torch's generator from the peer's
    stream, then calls `train_on_batch(x, y)` on each of its `steps` mini-batches (a model's own
    `train_step`, if it overrides one, runs there). Evaluation calls the model with
    ``training=False``: accuracy is the argmax of its output, the loss `compute_loss` (the
    compiled loss), `train.metrics` take the output as their logits.

    The factory must return the model compiled (``model.compile(optimizer=..., loss=...)``),
    with one tensor output. `train.optimizer`, `learning_rate`, `momentum` and `train.device`
    do not apply (Keras places the model); `train.loss`, `train.step` and `train.fedprox_mu`
    are refused.

    Parameters
    ----------
    config : TrainConfig
        The run's train section (`model` names the factory that built `model`).
    feature_shape : tuple of int
        One sample's shape (the model's input, without the batch axis).
    num_classes : int
        Classes of the dataset.
    model : keras.Model
        The compiled model the factory returned; this learner trains it for every peer in turn.
    """

    def __init__(self, config: TrainConfig, feature_shape: tuple[int, ...], num_classes: int, model: Any) -> None:
        _refuse_torch_fields(config, "Keras", "compiled loss and optimizer")
        check_keras_backend()
        if config.buffers == "local":
            raise ModelError("train.buffers: local keeps torch modules' buffers per peer; a Keras model's statistics "
                              "(e.g. batch norm's moving mean) travel with its weights: use train.buffers=average")
        self.local_buffers = False
        """Keras statistics always travel with the weights (`train.buffers: local` is refused above)."""
        self.config = config
        self.feature_shape = tuple(feature_shape)
        self.num_classes = num_classes
        self.model = self._ready(model)
        named = _keras_weights(self.model)
        self.layout = Layout(tuple(n for n, _ in named), tuple(tuple(v.shape) for _, v in named))
        self._variables = [v for _, v in named]
        self.device = self._variables[0].value.device
        self.params_device = torch.device("cpu")
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._optimizer_start = [(v, v.value.detach().clone()) for v in optimizer.variables]
        self._seed_states = [v for v in self.model.variables if v.path.endswith("seed_generator_state")]
        self.metric_fns = {name: resolve_function(ref, f"train.metrics.{name}") for name, ref in config.metrics.items()}
        self._initial: dict[int, Params] = {}

    def _ready(self, model: Any) -> Any:
        """`model` checked (compiled, one output) and built on this data's shape."""
        name = self.config.model
        if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
            raise ModelError(f"train.model: {name!r} returned a Keras model that is not compiled; call "
                             "model.compile(optimizer=..., loss=...) in the factory")
        if not model.built:
            model(np.zeros((1, *self.feature_shape), dtype="float32"))
        if not any(True for _ in model.weights):
            raise ModelError(f"train.model: {name!r} returned a Keras model without weights")
        return model

    def keep_params_on_device(self) -> None:
        """Params stay on the CPU (a Keras model keeps its own variables; each request copies in and out)."""

    def steps_for(self, samples: int, *, epochs: int | None = None, steps: int | None = None) -> int:
        """Mini-batch steps of one training request on `samples` samples (see `steps_per_round`)."""
        return steps_per_round(self.config, samples, epochs=epochs, steps=steps)

    def init_params(self, seed: int) -> Params:
        """The weights a fresh build of the factory gets with every random draw seeded by `seed`.

        Raises
        ------
        ModelError
            If the factory builds a model with other variables than the first build.
        """
        made = self._initial.get(seed)
        if made is None:
            with keras_build_scope(seed):
                fresh = self._ready(build_model(self.config.model, self.feature_shape, self.num_classes,
                                                self.config.model_options))
            made = self._initial[seed] = self._read(_keras_weights(fresh), self.layout)
            if len(self._initial) > 8:
                self._initial.pop(next(iter(self._initial)))
        return Params(made.flat.clone(), made.layout)

    @staticmethod
    def _read(named: list[tuple[str, Any]], layout: Layout) -> Params:
        if tuple(n for n, _ in named) != layout.names:
            raise ModelError("train.model: two builds of the Keras factory have different variables; "
                             "the factory must build the same model each call")
        return Params(torch.cat([v.value.detach().reshape(-1).to("cpu", torch.float32) for _, v in named]), layout)

    def _load(self, params: Params) -> None:
        with torch.no_grad():
            for variable, name in zip(self._variables, self.layout.names, strict=True):
                variable.value.copy_(params.tensor(name))

    def _tensors(self, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return data.x.to(self.device), data.y.to(self.device)

    def train(self, params: Params, data: Dataset, generator: torch.Generator, steps: int) -> TrainResult:
        """Train with `steps` calls of `train_on_batch` from `params`, batches drawn from the peer's `generator`.

        Returns
        -------
        TrainResult
            The trained weights, samples, steps and mean loss; `params` itself with 0 samples and
            NaN loss when there is no data or no step.
        """
        if len(data) == 0 or steps == 0:
            return TrainResult(params, 0, 0, float("nan"))
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import SeedGenerator

        self._load(params)
        with torch.no_grad():
            for variable, value in self._optimizer_start:
                variable.value.copy_(value)
            for state in self._seed_states:  # seeded dropout & co.: from the peer's stream, not the last peer's
                state.assign(np.array([_peer_seed(generator) % 2**31, 0], dtype=str(state.dtype)))
        x, y = self._tensors(data)
        indices = batch_indices(len(data), steps, self.config.batch_size, generator)
        seed = _peer_seed(generator)
        keep = global_state.get_global_attribute("global_seed_generator")
        losses: list[float] = []
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), warnings.catch_warnings():
                # keras turns each step's logs to numpy by np.array(tensor), which NumPy 2 warns about at every step
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"keras\.")
                torch.manual_seed(seed)  # unseeded dropout draws from torch's generator
                global_state.set_global_attribute("global_seed_generator", SeedGenerator(seed % 2**31))
                for idx in indices:
                    idx = idx.to(self.device)
                    logs = self.model.train_on_batch(x[idx], y[idx], return_dict=True)
                    losses.append(float(logs["loss"]))
        finally:
            global_state.set_global_attribute("global_seed_generator", keep)
        trained = self._read(list(zip(self.layout.names, self._variables, strict=True)), self.layout)
        return TrainResult(trained, sum(len(i) for i in indices), steps, sum(losses) / len(losses))

    @torch.no_grad()
    def evaluate(self, params: Params, data: Dataset) -> Evaluation:
        """Evaluate `params` on `data`: the model called with ``training=False``, loss by `compute_loss`.

        Returns
        -------
        Evaluation
            NaN values and 0 samples when `data` is empty.

        Raises
        ------
        ModelError
            If the model's output is not one tensor.
        """
        if len(data) == 0:
            return Evaluation(float("nan"), float("nan"), 0, dict.fromkeys(self.metric_fns, float("nan")))
        self._load(params)
        x, y = self._tensors(data)
        correct, loss_sum, outputs = 0, 0.0, []
        for start in range(0, len(data), EVAL_BATCH):
            xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            out = self.model(xb, training=False)
            if not isinstance(out, torch.Tensor):
                raise ModelError(f"train.model: the Keras model's output is a {type(out).__name__}; meshfl needs one tensor output")
            correct += int((out.argmax(1) == yb).sum())
            loss_sum += float(self.model.compute_loss(x=xb, y=yb, y_pred=out, training=False)) * len(yb)
            if self.metric_fns:
                outputs.append(out)
        metrics: dict[str, float] = {}
        if self.metric_fns:
            out = torch.cat(outputs)
            metrics = {name: float(fn(out, y)) for name, fn in self.metric_fns.items()}
        return Evaluation(correct / len(data), loss_sum / len(data), len(data), metrics)

