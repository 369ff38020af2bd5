"""Process set-up shared by the entry points: logging per rank, device (with Paddle loaded), seeds."""
from __future__ import annotations

import logging
import random
import sys

import numpy as np
import paddle

from . import dist
from .device import CPU, GPU, Device, DeviceError, no_gpu_message


def setup_logging(verbose_all_ranks: bool = False) -> None:
    """One log format for every rank; rank 0 logs progress, others only warnings."""
    rank = dist.get_rank()
    level = logging.INFO if rank == 0 or verbose_all_ranks else logging.WARNING
    logging.basicConfig(stream=sys.stdout, level=level, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def set_device(device: Device) -> Device:
    """Place this process on ``device`` (from ``pipeline.device.choose_device``), confirmed by Paddle itself.

    On a GPU this is the card the launcher gave the worker (``paddle.set_device('gpu')`` reads
    FLAGS_selected_gpus). Where Paddle sees no GPU after all, a required GPU (use_gpu=true) stops
    (DeviceError) and auto falls back to the CPU with a warning: the CPU thread settings were not
    applied before Paddle loaded.
    """
    if device.is_gpu:
        count = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
        if count == 0:
            why = "Paddle sees no GPU (paddle.device.cuda.device_count() is 0)"
            if device.required:
                raise DeviceError(no_gpu_message(why))
            logging.getLogger(__name__).warning("%s: running on CPU without the CPU thread settings "
                                                "(set use_gpu=false for them)", why)
            device = Device(CPU, f"use_gpu=auto: {why}")
    paddle.set_device(GPU if device.is_gpu else CPU)
    return device


def current_device() -> str:
    """Paddle's current place: 'cpu' or 'gpu:N'."""
    return paddle.get_device()


def on_gpu() -> bool:
    """Whether Paddle's current place is a GPU: the device actually in use, whatever the config said."""
    return current_device().startswith(GPU)


def check_amp_on_device(amp: str) -> None:
    """Stop (DeviceError) for a precision the current device cannot train in, instead of silently not using it.

    On a GPU without it, Paddle's auto_cast only warns and runs in float32, and ``decorate`` (O2)
    returns the model unchanged (``amp/auto_cast.py``): a run that asked for AMP would quietly not have it.
    """
    if amp == "fp16" and not on_gpu():
        raise DeviceError("amp=fp16 needs a GPU and this run is on CPU; use amp=bf16 or off on CPU")
    if amp == "fp16" and not paddle.amp.is_float16_supported():
        raise DeviceError(f"amp=fp16 but {current_device()} has no float16 support "
                          "(paddle.amp.is_float16_supported() is False; it needs compute capability 7.0 or newer); "
                          "use amp=off")
    if amp == "bf16" and on_gpu() and not paddle.amp.is_bfloat16_supported():
        raise DeviceError(f"amp=bf16 but {current_device()} has no bfloat16 support "
                          "(paddle.amp.is_bfloat16_supported() is False; it needs compute capability 8.0 and "
                          "CUDA 11 or newer); use amp=fp16")


# Paddle's flags for deterministic GPU kernels: cuDNN's algorithm choice and the embedding gradient's
# atomic adds. They exist only in CUDA builds (a CPU build does not define them).
DETERMINISTIC_FLAGS = {"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1}


def set_deterministic() -> dict:
    """Turn Paddle's deterministic-kernel flags on where this build has them; return the flags set."""
    defined = set(paddle.base.core.globals().keys())
    flags = {name: value for name, value in DETERMINISTIC_FLAGS.items() if name in defined}
    if flags:
        paddle.set_flags(flags)
    return flags


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and Paddle."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
