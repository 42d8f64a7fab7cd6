"""Local training steps: the user's own (`train.step`), and FedProx built on the same interface.

A training step is a function

    step(module, batches, *, optimizer, loss, global_params, config) -> mean loss (float, tensor or None)

called once per training request of a peer:

- `module`: the peer's `torch.nn.Module`, in training mode, loaded with the model it was given.
  What the function leaves in its parameters (and buffers) is the trained model.
- `batches`: an iterator of `(x, y)` mini-batches on the training device, exactly the batches
  meshfl's own loop would use, in the same order (drawn from the peer's seeded generator), as
  many as the request asks for (`train.local_epochs` or `train.local_steps`). Samples and steps
  reported are those of the batches taken, so stopping early is honest.
- `optimizer`: a fresh optimiser from `train.optimizer`, `learning_rate`, `momentum` over
  `module.parameters()`; use it, or build your own (any torch optimiser) over the same parameters.
- `loss`: the configured loss, `(logits, labels) -> scalar tensor` (cross-entropy by default).
- `global_params`: `{name: tensor}`, detached copies of the given model's parameters (as
  `module.named_parameters()`), e.g. for a proximal term.
- `config`: the `TrainConfig` (`config.fedprox_mu`, `config.learning_rate`, ...).

Randomness: a step (and the model's random layers) may use torch's global generator: meshfl
seeds it from the peer's own stream for the request and restores it afterwards, so runs stay
deterministic. Return the mean training loss over the batches (None if not computed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from meshfl.config import TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[..., Any]


def sgd_step(module: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, optimizer: torch.optim.Optimizer,
             loss: LossFn, global_params: dict[str, torch.Tensor], config: TrainConfig) -> float | None:
    """meshfl's own loop written as a training step (a template for yours): one optimiser step per batch.

    Parameters
    ----------
    module : torch.nn.Module
        The peer's model, loaded with the model it was given, in training mode; trained in place.
    batches : iterator of (Tensor, Tensor)
        The request's mini-batches, in meshfl's order.
    optimizer : torch.optim.Optimizer
        A fresh optimiser over `module.parameters()` from the train config.
    loss : callable
        ``(logits, labels) -> scalar tensor``.
    global_params : dict of str to Tensor
        The given model's parameters (detached copies), by name.
    config : TrainConfig
        The run's train section.

    Returns
    -------
    float or None
        The mean loss over the batches taken (None when there were none).
    """
    total, steps = None, 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        value = loss(module(x), y)
        value.backward()
        optimizer.step()
        total = value.detach() if total is None else total + value.detach()
        steps += 1
    return None if total is None else float(total) / steps


def fedprox(module: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, optimizer: torch.optim.Optimizer,
            loss: LossFn, global_params: dict[str, torch.Tensor], config: TrainConfig) -> float | None:
    """FedProx (Li et al., 2020): minimise loss + (mu/2)||w - w_given||^2, mu = `config.fedprox_mu`.

    The proximal term's gradient mu (w - w_given) is added to each parameter's gradient after
    backward (the same gradient as putting the term in the loss, without its forward cost).
    The loss reported is the data loss alone, comparable with plain local training.

    Parameters and Returns are those of `sgd_step`.
    """
    mu = config.fedprox_mu
    named = [(p, global_params[name]) for name, p in module.named_parameters() if p.requires_grad]
    total, steps = None, 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        value = loss(module(x), y)
        value.backward()
        with torch.no_grad():
            for p, anchor in named:
                if p.grad is None:
                    p.grad = mu * (p - anchor)
                else:
                    p.grad.add_(p - anchor, alpha=mu)
        optimizer.step()
        total = value.detach() if total is None else total + value.detach()
        steps += 1
    return None if total is None else float(total) / steps
