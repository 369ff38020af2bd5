"""Optimisation: AdamW with linear warmup and decay, no weight decay on biases and norms.

Gradient clipping is not the optimiser's: the trainer computes the global gradient
norm once per step (``global_grad_norm``) and uses that one number both to skip
steps whose gradients are NaN/Inf and to clip (``clip_grads_``). Paddle's
``ClipGradByGlobalNorm`` inside the optimiser would compute the norm a second time.
The norm stays a tensor on the device: on a GPU reading it (``float()``) makes the
host wait for the step, so the trainer reads it on log steps only.
"""
from __future__ import annotations

import re

import paddle
from paddlenlp.transformers import LinearDecayWithWarmup

from .config import TrainConfig

try:
    # Paddle's own clipping uses this one-kernel squared norm: one pass over each gradient instead of
    # paddle.sum(paddle.square(g))'s two and a temporary, and paddle.linalg.norm loses digits in float32.
    from paddle.nn.clip import _squared_l2_norm
except ImportError:  # private helper: fall back to the public two-op form if a Paddle release drops it
    def _squared_l2_norm(grad):
        return paddle.sum(paddle.square(grad))

NO_DECAY_MARKERS = ("bias", "norm")  # LayerNorm weights and every bias are not decayed


def decayed_parameter_names(model: paddle.nn.Layer) -> set[str]:
    """Internal names of the parameters that get weight decay."""
    return {
        parameter.name
        for name, parameter in model.named_parameters()
        if not any(marker in name.lower() for marker in NO_DECAY_MARKERS)
    }


# Where a parameter sits in every encoder family we load (bert., ernie., roberta., electra. prefixes).
ENCODER_LAYER = re.compile(r"\.encoder\.layers?\.(\d+)\.")
EMBEDDINGS = re.compile(r"(^|\.)embeddings\.")


def layer_lr_multipliers(model: paddle.nn.Layer, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay: structure name -> multiplier of the learning rate.

    With N encoder layers, layer i (0 at the bottom) gets ``decay ** (N - i)``, the embeddings
    ``decay ** (N + 1)``, and everything above the encoder (the head, the CRF, the pooler) 1: the lower
    a layer, the more general what it learnt in pre-training, and the less it should move.
    """
    names = [name for name, _ in model.named_parameters()]
    layers = {name: int(match.group(1)) for name in names if (match := ENCODER_LAYER.search(name))}
    if not layers:
        raise ValueError("layer_lr_decay: no encoder layers found among the model's parameters "
                         f"(expected names like 'bert.encoder.layers.0.*'; first names: {names[:3]})")
    depth = max(layers.values()) + 1
    multipliers = {}
    for name in names:
        if name in layers:
            multipliers[name] = decay ** (depth - layers[name])
        elif EMBEDDINGS.search(name):
            multipliers[name] = decay ** (depth + 1)
        else:
            multipliers[name] = 1.0
    return multipliers


def apply_layer_lr_decay(model: paddle.nn.Layer, decay: float) -> None:
    """Set each encoder parameter's learning-rate multiplier (Paddle's ``optimize_attr``, which every
    optimiser multiplies into the scheduled rate on CPU and GPU alike; AdamW's own ``lr_ratio`` is
    GPU-only). Parameters above the encoder keep theirs (the CRF's transitions have 100). Setting, not
    multiplying, so that building a second optimiser for the same model gives the same rates."""
    if decay == 1.0:
        return
    multipliers = layer_lr_multipliers(model, decay)
    for name, parameter in model.named_parameters():
        multiplier = multipliers[name]
        if multiplier != 1.0:
            parameter.optimize_attr["learning_rate"] = multiplier


def build_optimizer(config: TrainConfig, model: paddle.nn.Layer, total_steps: int):
    """AdamW plus its learning-rate schedule; the schedule is stepped once per optimiser step.

    No ``grad_clip``: callers clip with ``clip_grads_`` (see the module docstring).
    """
    warmup_steps = int(round(config.warmup_ratio * total_steps))
    schedule = LinearDecayWithWarmup(config.learning_rate, total_steps, warmup_steps)
    apply_layer_lr_decay(model, config.layer_lr_decay)
    decayed = decayed_parameter_names(model)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=schedule,
        parameters=model.parameters(),
        weight_decay=config.weight_decay,
        apply_decay_param_fun=lambda name: name in decayed,
    )
    return optimizer, schedule


def _gradients(parameters) -> list:
    return [p.grad for p in parameters if p.grad is not None]


@paddle.no_grad()
def global_grad_norm(parameters) -> paddle.Tensor:
    """L2 norm of all gradients together (float32 sums, whatever the gradients' dtype); NaN/Inf if any is.

    A float32 tensor on the gradients' device, not read here. With data parallelism the gradients
    are already all-reduced, so every rank gets the same number and takes the same decisions from it.
    """
    grads = _gradients(parameters)
    if not grads:
        return paddle.zeros([1], dtype="float32")
    squares = [_squared_l2_norm(g if g.dtype == paddle.float32 else g.astype("float32")) for g in grads]
    return paddle.sqrt(paddle.add_n(squares))


@paddle.no_grad()
def clip_grads_(parameters, max_norm: float, norm: paddle.Tensor, skip_unclipped: bool = True) -> bool:
    """Scale gradients in place so that their global norm ``norm`` is at most ``max_norm``.

    The factor is ``paddle.nn.ClipGradByGlobalNorm``'s, max_norm / max(norm, max_norm). With
    ``skip_unclipped`` (on CPU, where reading the norm costs nothing) the norm is read and gradients
    within ``max_norm`` are left alone: a pass over every gradient that would change nothing. Without it
    (on a GPU, where the read would stall the device) every gradient is multiplied by the factor on the
    device, as Paddle's clip does. Returns whether the gradients were (or, on the device, may have been) scaled.
    """
    if max_norm <= 0:
        return False
    if skip_unclipped:
        value = float(norm)
        if not value > max_norm:
            return False
        factor = max_norm / value
        for grad in _gradients(parameters):
            grad.scale_(factor)
        return True
    factor = max_norm / paddle.maximum(norm, paddle.full_like(norm, max_norm))
    for grad in _gradients(parameters):
        grad.multiply_(factor.astype(grad.dtype))
    return True
