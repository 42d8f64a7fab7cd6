"""Models: the built-in zoo (`mlp`, `cnn`, `lenet5`) and the user's own `torch.nn.Module` factories.

`train.model` is a zoo name, or `package.module:factory` naming a callable in the user's own
code, imported on the machine that runs the peer (never from anything received over the
network), or `python:<name>` for a factory object handed to `meshfl.run` in this process
(`register_factory`; such an object cannot be rebuilt in another process).

A factory is called with the keyword arguments it names among `feature_shape` (a tuple, e.g.
(1, 28, 28)) and `num_classes` (every one of them if it takes `**kwargs`), plus
`train.model_options`; it must return an `nn.Module` whose parameters are float32, a
`LightningModule` (trained with its own `training_step` and `configure_optimizers`) or a
compiled Keras 3 `Model` on the torch backend (trained with its own loss and optimiser): see
`meshfl.learn.adapters`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MODELS = ("mlp", "cnn", "lenet5")
SHAPE_ARGS = ("feature_shape", "num_classes")

_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_PYTHON = "python:"

_EXTRAS = {"pytorch_lightning": "pip install 'meshfl[lightning]'", "lightning": "pip install 'meshfl[lightning]'",
           "keras": "pip install 'meshfl[keras]'"}
"""What to install when a user module needs a framework meshfl adapts (see `meshfl.learn.adapters`)."""

_FACTORIES: dict[str, Callable[..., Any]] = {}
"""Factory objects handed over in this process (`python:<name>` references)."""


class ModelError(ValueError):
    """A user-fixable model problem; the message is one line naming `train.model` (or the field at fault)."""


def mlp(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """784-256-128-10 on MNIST, the network of P2PFL's MNIST example."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(feature_shape), 256), nn.ReLU(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def cnn(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 convolutions with max-pooling, then a small classifier; needs [C, H, W] input.

    Raises
    ------
    ValueError
        If `feature_shape` is not [channels, height, width].
    """
    if len(feature_shape) != 3:
        raise ValueError(f"train.model=cnn needs image data shaped [channels, height, width], got {list(feature_shape)}; use mlp")
    channels, height, width = feature_shape
    flat = 32 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


LENET5_MIN_SIDE = 12
"""Smallest image side LeNet-5 takes: 12 -> 12 -> 6 -> 2 -> 1 after its convolutions and poolings."""


def lenet5(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) as commonly used for MNIST, with ReLU and max pooling.

    conv 6@5x5 (padding 2) -> ReLU -> max pool 2 -> conv 16@5x5 -> ReLU -> max pool 2 -> fc 120 -> ReLU
    -> fc 84 -> ReLU -> fc `num_classes`. The original's tanh/sigmoid and average (subsampling)
    pooling are replaced by ReLU and max pooling, as most MNIST baselines do. Weights start from He
    (Kaiming normal) initialisation for ReLU and biases from 0: with PyTorch's default initialisation
    this 5-layer ReLU net sits ~250 steps on its initial loss at lr 0.01 (measured on MNIST) and the
    plateau, not the algorithm, decides time-to-accuracy comparisons. The flatten size is
    computed from the input, so any [C, H, W] with H, W >= 12 works: 1x28x28 gives 16x5x5 and
    61,706 parameters for 10 classes.

    Raises
    ------
    ValueError
        If `feature_shape` is not [channels, height, width] or an image side is below 12.
    """
    if len(feature_shape) != 3:
        raise ValueError(f"train.model=lenet5 needs image data shaped [channels, height, width], got {list(feature_shape)}; "
                         "use mlp (or data.feature_shape)")
    channels, height, width = feature_shape
    if min(height, width) < LENET5_MIN_SIDE:
        raise ValueError(f"train.model=lenet5 needs images of at least {LENET5_MIN_SIDE}x{LENET5_MIN_SIDE}, got "
                         f"{height}x{width}; use cnn")

    def side(n: int) -> int:  # conv 5x5 pad 2 keeps n; pool halves; conv 5x5 takes 4; pool halves
        return (n // 2 - 4) // 2

    model = nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * side(height) * side(width), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


_ZOO: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {"mlp": mlp, "cnn": cnn, "lenet5": lenet5}


def check_model_name(name: str) -> str:
    """Check that `name` is a zoo name, `package.module:factory` or `python:<name>`, for the config's validation.

    Only the form is checked here: the import happens where the model is built, so a run
    folder's config can be read (merged, reported) on a machine without the user's code.

    Returns
    -------
    str
        `name`.

    Raises
    ------
    ValueError
        If it is none of those.
    """
    if name in MODELS or _REF.match(name) or (name.startswith(_PYTHON) and len(name) > len(_PYTHON)):
        return name
    raise ValueError(f"must be {_zoo_names()} or a factory `package.module:factory` returning a torch.nn.Module")


def _zoo_names() -> str:
    """'mlp, cnn or lenet5': the zoo's names, for errors."""
    return f"{', '.join(MODELS[:-1])} or {MODELS[-1]}"


def is_user_model(name: str) -> bool:
    """Whether `train.model` names a user factory rather than a zoo model."""
    return name not in MODELS


def register_factory(factory: Any) -> str:
    """Give the `train.model` reference for a factory object.

    `module:qualname` when importing that gives back the same object (so peer processes can
    build it too), else `python:<name>`, usable only in this process (the simulator).

    Parameters
    ----------
    factory : callable
        A function or class returning a fresh module (or Keras model).

    Returns
    -------
    str
        The reference.

    Raises
    ------
    ModelError
        If `factory` is a module or Keras model instance, or not callable.
    """
    if isinstance(factory, nn.Module) or is_keras_model(factory):
        raise ModelError(f"model: pass a factory (the class {type(factory).__name__}, or a function returning "
                         "a fresh module or Keras model), not an instance: meshfl builds the initial model from the run seed")
    if not callable(factory):
        raise ModelError(f"model: must be a callable returning a torch.nn.Module (got {type(factory).__name__})")
    return register_function(factory, "model")


def register_function(fn: Any, field: str, name: str | None = None) -> str:
    """Give the reference for a function object given to `meshfl.run` (model factory, loss, metric, step).

    `module:qualname` when importing that gives back the same object (so peer processes can
    import it too), else `python:<name>`, usable only in this process (the simulator).

    Parameters
    ----------
    fn : callable
        The function object.
    field : str
        The argument's name, for errors.
    name : str, optional
        Replaces the function's own name in a `python:` reference.

    Returns
    -------
    str
        The reference.

    Raises
    ------
    ModelError
        If `fn` is not callable.
    """
    if not callable(fn):
        raise ModelError(f"{field}: must be a callable (got {type(fn).__name__})")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if name is None and module and qualname and module != "__main__" and "<" not in qualname:
        ref = f"{module}:{qualname}"
        try:
            if _import_ref(ref, field) is fn:
                return ref
        except ModelError:
            pass
    name = re.sub(r"[^\w.]+", "_", name or qualname or type(fn).__name__)
    ref = f"{_PYTHON}{name}"
    if _FACTORIES.get(ref, fn) is not fn:
        ref = f"{_PYTHON}{name}-{id(fn):x}"
    _FACTORIES[ref] = fn
    return ref


def check_function_ref(ref: str) -> str:
    """Check that `ref` is `package.module:function` or `python:<name>`, for the config's validation.

    Only the form is checked (the import happens on the peer's machine).

    Returns
    -------
    str
        `ref`.

    Raises
    ------
    ValueError
        If it is neither.
    """
    if _REF.match(ref) or (ref.startswith(_PYTHON) and len(ref) > len(_PYTHON)):
        return ref
    raise ValueError(f"must be a function `package.module:function` (got {ref!r})")


def resolve_function(ref: str, field: str) -> Callable[..., Any]:
    """Import the callable a `package.module:function` or `python:<name>` reference names.

    Imported here, on the machine that runs the peer.

    Parameters
    ----------
    ref : str
        The reference.
    field : str
        The config field it comes from, for errors.

    Returns
    -------
    callable
        The function.

    Raises
    ------
    ModelError
        One line naming `field`, if it cannot be had.
    """
    if ref.startswith(_PYTHON):
        if ref not in _FACTORIES:
            raise ModelError(f"{field}: {ref!r} is a function object given to meshfl.run in another process; "
                             "it cannot be had here: give an importable `package.module:function`")
        return _FACTORIES[ref]
    return _import_ref(ref, field)


def function_name(ref: str) -> str:
    """The short name of a reference: `pkg.mod:f1_score` -> `f1_score`, `python:macro_f1` -> `macro_f1`."""
    return re.split(r"[:.]", ref)[-1].split("-")[0] if not ref.startswith(_PYTHON) else ref[len(_PYTHON):]


def portable(name: str) -> bool:
    """Whether another process (a `meshfl node` peer) can build `name`.

    True for a zoo name or an importable reference outside `__main__`.
    """
    return not name.startswith(_PYTHON) and not name.startswith("__main__:")


def resolve_factory(name: str) -> Callable[..., Any]:
    """Find the factory `train.model` names (a zoo function, a `python:` object, or an import).

    Raises
    ------
    ModelError
        One line naming train.model, if it cannot be had.
    """
    if name in _ZOO:
        return _ZOO[name]
    if name.startswith(_PYTHON):
        if name not in _FACTORIES:
            raise ModelError(f"train.model: {name!r} is a factory object given to meshfl.run in another process; "
                             "it cannot be rebuilt here: give an importable factory `package.module:factory`")
        return _FACTORIES[name]
    return _import_ref(name)


def _import_ref(ref: str, field: str = "train.model") -> Callable[..., Any]:
    if not _REF.match(ref):
        if field == "train.model":
            raise ModelError(f"train.model: must be {_zoo_names()} or `package.module:factory` (got {ref!r})")
        raise ModelError(f"{field}: must be `package.module:function` (got {ref!r})")
    module_name, attribute = ref.split(":", 1)
    if "keras" not in sys.modules:  # user code that imports keras gets its torch backend (the only one meshfl trains)
        os.environ.setdefault("KERAS_BACKEND", "torch")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # `meshfl run` (a console script) finds modules of the current folder too
        sys.path.append(cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix; one line
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        extra = _EXTRAS.get((missing or "").split(".")[0])
        if extra is not None:
            raise ModelError(f"{field}: module {module_name!r} needs {missing!r}, which is not installed: {extra}") from None
        raise ModelError(f"{field}: module {module_name!r} does not import ({type(exc).__name__}: {_first_line(exc)}); "
                         "it must be importable on this machine (PYTHONPATH or the current folder)") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{field}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{field}: {ref!r} is not callable (it is a {type(obj).__name__}); name a function"
                         + (" or class that returns a torch.nn.Module" if field == "train.model" else ""))
    return obj


def build_model(name: str, feature_shape: tuple[int, ...], num_classes: int,
                options: dict[str, Any] | None = None) -> nn.Module:
    """Build a fresh module for `train.model` (zoo name or user factory) and the data's shape.

    Parameters
    ----------
    name : str
        `train.model`.
    feature_shape : tuple[int, ...]
        The shape of one sample; passed to a factory that names `feature_shape`.
    num_classes : int
        Output classes; passed to a factory that names `num_classes`.
    options : dict, optional
        `train.model_options`, passed as keyword arguments (zoo models take none).

    Returns
    -------
    torch.nn.Module
        The module (or a LightningModule, or a Keras model on the torch backend).

    Raises
    ------
    ModelError
        If the factory cannot be had or called, returns something else, has parameters that are
        not float32 or none at all, or a zoo model is given options.
    ValueError
        If `cnn` or `lenet5` is given data that is not [C, H, W] (or `lenet5` images below 12x12).
    """
    factory = resolve_factory(name)
    if name in MODELS:
        if options:
            raise ModelError(f"train.model_options: the built-in model {name!r} takes no options (got {sorted(options)})")
        return factory(feature_shape, num_classes)
    kwargs = dict(options or {})
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        shape = {"feature_shape": tuple(feature_shape), "num_classes": num_classes}
        for arg in SHAPE_ARGS:
            if (arg in params or takes_any) and arg not in kwargs:
                kwargs[arg] = shape[arg]
    try:
        with _build_scope():
            module = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"train.model: calling {name!r} with {sorted(kwargs) or 'no arguments'} failed ({_first_line(exc)}); "
                         "a factory takes feature_shape and/or num_classes by name, and train.model_options") from None
    if is_keras_model(module):
        from meshfl.learn.adapters import check_keras_backend

        check_keras_backend()
    if not isinstance(module, nn.Module):
        raise ModelError(f"train.model: {name!r} returned a {type(module).__name__}, not a torch.nn.Module "
                         "(nor a LightningModule or a Keras model)")
    bad = [n for n, p in module.named_parameters() if p.dtype.is_floating_point and p.dtype != torch.float32]
    if bad:
        raise ModelError(f"train.model: {name!r} has parameters that are not float32 ({bad[0]}); meshfl models are float32 "
                         "(call .float() in the factory)")
    if not any(True for _ in module.parameters()):
        raise ModelError(f"train.model: {name!r} returned a module without parameters")
    return module


def _build_scope() -> contextlib.AbstractContextManager[None]:
    """Where a user factory runs: with keras imported, layer names counted afresh (see `adapters.keras_build_scope`)."""
    if "keras" not in sys.modules:
        return contextlib.nullcontext()
    from meshfl.learn.adapters import keras_build_scope

    return keras_build_scope()


def is_keras_model(obj: Any) -> bool:
    """Whether `obj` is a Keras 3 `keras.Model` (keras is only looked at if it was imported already)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, getattr(keras, "Model", ()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
