"""Models of other frameworks a user would write, imported by tests as `framework_models_for_tests:<name>`.

This module imports keras: meshfl sets KERAS_BACKEND=torch before importing it (when unset).
"""

from __future__ import annotations

import math

import keras
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class DigitsLightning(pl.LightningModule):
    """A small MLP with dropout; its own loss (NLL of log-softmax), optimiser (Adam) and a step-wise scheduler."""

    def __init__(self, feature_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(feature_shape), hidden), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return F.log_softmax(self.net(x), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.nll_loss(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ManualLightning(DigitsLightning):
    """The same model trained by manual optimisation (`self.optimizers()`, `self.manual_backward`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = F.nll_loss(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()
        return loss


def digits_keras(feature_shape, num_classes, hidden=32):
    """A compiled Keras MLP with batch norm and dropout (Adam, sparse cross-entropy on logits)."""
    model = keras.Sequential([
        keras.Input(tuple(feature_shape)),
        keras.layers.Flatten(),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(num_classes),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def uncompiled_keras(feature_shape, num_classes):
    return keras.Sequential([keras.Input(tuple(feature_shape)), keras.layers.Flatten(), keras.layers.Dense(num_classes)])


class HookedLightning(DigitsLightning):
    """Records the hooks meshfl calls; `on_train_batch_start` ends the request at its fourth batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[str] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.calls.append("on_train_batch_start")
        return -1 if self.calls.count("on_train_batch_start") == 4 else None

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.calls.append("optimizer_zero_grad")
        optimizer.zero_grad()

    def on_before_backward(self, loss):
        self.calls.append("on_before_backward")

    def on_after_backward(self):
        self.calls.append("on_after_backward")

    def on_before_optimizer_step(self, optimizer):
        self.calls.append("on_before_optimizer_step")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.calls.append("optimizer_step")
        optimizer.step(closure=optimizer_closure)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.calls.append("on_train_batch_end")

    def lr_scheduler_step(self, scheduler, metric):
        self.calls.append("lr_scheduler_step")
        scheduler.step()
