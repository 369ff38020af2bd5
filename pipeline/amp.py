"""Automatic mixed precision: the autocast context, O2 decoration and the fp16 loss scaler, from the config.

One object owns every AMP decision, so the training step, evaluation during training and the
NaN/Inf handling ask it instead of re-reading ``config.amp``. Evaluation during training runs in
float32 without autocast (``float32_weights``), as ``predict.py`` runs the saved model: the dev
metrics that select ``best_model`` are those of the labels ``predict.py`` gives.
"""
from __future__ import annotations

import contextlib

import paddle
from paddle.amp.auto_cast import amp_initialize

from .config import TrainConfig
from .heads import head_of


class AmpPolicy:
    """Autocast context, optional O2 decoration and the fp16 loss scaler, from the config."""

    def __init__(self, config: TrainConfig):
        self.enabled = config.amp != "off"
        self.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(config.amp, "float32")
        self.level = config.amp_level
        # Only fp16 needs loss scaling: bf16 has float32's exponent range.
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=config.init_loss_scaling) if config.amp == "fp16" else None

    @staticmethod
    def float32_layers(model) -> list:
        """Layers whose parameters O2 leaves in float32: the CRF, whose transitions meet the float32
        emissions in its loss (computed outside autocast) and in the Viterbi scores saved with the model."""
        return [model.crf] if head_of(model) == "crf" else []

    def decorate(self, model, optimizer):
        """Cast parameters for O2 (keeping float32 master weights in the optimizer), the CRF excepted."""
        if self.enabled and self.level == "O2":
            return paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype=self.dtype,
                                       excluded_layers=self.float32_layers(model))
        return model, optimizer

    def autocast(self):
        """Context for the training forward (evaluation runs under ``float32_weights`` instead)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype)

    @contextlib.contextmanager
    def float32_weights(self, model):
        """Evaluate as ``predict.py`` runs the saved model: in float32, outside autocast.

        Under O2 the parameters are float16/bfloat16 between steps; for the duration they are cast to
        float32, the very values ``model.pdparams`` holds (saving casts them up the same way), and back
        afterwards with ``decorate``'s own cast (``amp_initialize``, the same layers kept float32), which
        gives the same values again: float32 holds every float16 and bfloat16 value exactly. Casting is in
        place, so the optimiser and DataParallel keep their parameters. Without O2 nothing is cast.
        """
        low_precision = any(p.dtype in (paddle.float16, paddle.bfloat16) for p in model.parameters())
        if low_precision:
            model.float()
        try:
            yield model
        finally:
            if low_precision:
                amp_initialize(models=[model], dtype=self.dtype, excluded_layers=self.float32_layers(model))

    def backward(self, loss):
        """Backward of the (scaled, for fp16) loss."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer):
        """Undo the fp16 loss scale on the gradients before they are measured or clipped."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        """Optimiser step; with fp16 the scaler skips on Inf/NaN (found when unscaling) and adapts the scale."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def skip(self, optimizer):
        """A step whose gradients are not finite: only the fp16 scaler acts (it skips the update itself and
        lowers the scale); without one there is nothing to do."""
        if self.scaler:
            self.step(optimizer)

    def scaler_state(self) -> dict | None:
        """The loss scaler's state for a training state, or None without one."""
        return self.scaler.state_dict() if self.scaler else None
