"""Automatic mixed precision: the autocast context, O2 decoration and the fp16 loss scaler, from the config.

One object owns every AMP decision, so the training step, evaluation during training and the
NaN/Inf handling ask it instead of re-reading ``config.amp``. Evaluation during training runs in
float32 without autocast (``float32_weights``), as ``predict.py`` runs the saved model: the dev
metrics that select ``best_model`` are those of the labels ``predict.py`` gives.
"""
from __future__ import annotations

import contextlib
import math

import paddle
from paddle.amp.auto_cast import amp_initialize

from .config import TrainConfig
from .heads import head_of

# What an optimiser step came to (``AmpPolicy.step``).
APPLIED = "applied"
LOSS_SCALE_OVERFLOW = "loss-scale overflow"  # fp16 gradients overflowed the scale: skipped, scale lowered
NOT_FINITE = "not finite"  # NaN/Inf that no loss scale explains: a bad step, counted toward max_bad_steps
# At a scale of 1 the gradients are not scaled at all (Paddle's scaler has no floor and halves on): an
# overflow at or below it is the gradients' own, not the scale's.
LOSS_SCALE_FLOOR = 1.0


class AmpPolicy:
    """Autocast context, optional O2 decoration and the fp16 loss scaler, from the config."""

    def __init__(self, config: TrainConfig):
        self.enabled = config.amp != "off"
        self.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(config.amp, "float32")
        self.level = config.amp_level
        # Only fp16 needs loss scaling: bf16 has float32's exponent range.
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=config.init_loss_scaling) if config.amp == "fp16" else None
        if self.scaler is not None and not self.scaler.is_enable():
            self.scaler = None  # Paddle disables it off a GPU (amp/grad_scaler.py): it would skip nothing

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

    def step(self, optimizer, grad_norm, loss) -> str:
        """Apply the (unscaled, clipped) gradients unless they are not finite: APPLIED, LOSS_SCALE_OVERFLOW
        or NOT_FINITE.

        The one host read of a step is whether to skip it: Paddle's dygraph optimizer needs that on the
        host (``Optimizer._create_optimization_pass`` reads the scaler's ``found_inf``, leaving a Python
        bool in its place). With fp16 that read is Paddle's own; otherwise it is the finiteness of
        ``grad_norm``, computed on the device. The norm itself is not read.

        With fp16 a skipped step is a LOSS_SCALE_OVERFLOW, the scaler's ordinary business (it lowers the
        scale and goes on), when the scale was above ``LOSS_SCALE_FLOOR`` and the step's ``loss`` (a
        device tensor, read only then) finite; otherwise the scaler cannot explain it: NOT_FINITE.
        """
        if self.scaler is None:
            if not bool(paddle.isfinite(grad_norm).all()):
                return NOT_FINITE
            optimizer.step()
            return APPLIED
        self.scaler.step(optimizer)  # skips the update itself when unscale_ found Inf/NaN
        outcome = APPLIED
        if self._scaler_skipped():
            scale = float(self.scaler.state_dict()["scale"])  # the scale that overflowed, before update lowers it
            explained = scale > LOSS_SCALE_FLOOR and math.isfinite(float(loss))
            outcome = LOSS_SCALE_OVERFLOW if explained else NOT_FINITE
        self.scaler.update()  # lowers the scale after a skip, raises it after enough good steps
        return outcome

    def _scaler_skipped(self) -> bool:
        # GradScaler.step keeps the optimiser's verdict in _cache_found_inf (amp/grad_scaler.py): the Python
        # bool Paddle's optimiser left after reading found_inf, so reading it costs no device sync.
        return bool(self.scaler._cache_found_inf)

    def scaler_state(self) -> dict | None:
        """The loss scaler's state for a training state, or None without one."""
        return self.scaler.state_dict() if self.scaler else None
