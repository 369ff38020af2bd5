"""Optimisation: AdamW with linear warmup and decay, no weight decay on biases and norms."""
from __future__ import annotations

import paddle
from paddlenlp.transformers import LinearDecayWithWarmup

from .config import TrainConfig

NO_DECAY_MARKERS = ("bias", "norm")  # LayerNorm weights and every bias are not decayed


def decayed_parameter_names(model: paddle.nn.Layer) -> set[str]:
    """Internal names of the parameters that get weight decay."""
    return {
        parameter.name
        for name, parameter in model.named_parameters()
        if not any(marker in name.lower() for marker in NO_DECAY_MARKERS)
    }


def build_optimizer(config: TrainConfig, model: paddle.nn.Layer, total_steps: int):
    """AdamW plus its learning-rate schedule; the schedule is stepped once per optimiser step."""
    warmup_steps = int(round(config.warmup_ratio * total_steps))
    schedule = LinearDecayWithWarmup(config.learning_rate, total_steps, warmup_steps)
    decayed = decayed_parameter_names(model)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=schedule,
        parameters=model.parameters(),
        weight_decay=config.weight_decay,
        apply_decay_param_fun=lambda name: name in decayed,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(config.max_grad_norm) if config.max_grad_norm > 0 else None,
    )
    return optimizer, schedule
