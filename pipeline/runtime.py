"""Process set-up shared by the entry points: logging per rank, device, seeds."""
from __future__ import annotations

import logging
import random
import sys

import numpy as np
import paddle

from . import dist


def setup_logging(verbose_all_ranks: bool = False) -> None:
    """One log format for every rank; rank 0 logs progress, others only warnings."""
    rank = dist.get_rank()
    level = logging.INFO if rank == 0 or verbose_all_ranks else logging.WARNING
    logging.basicConfig(stream=sys.stdout, level=level, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def set_device(use_gpu: bool) -> str:
    """Select the GPU the launcher gave this worker, or the CPU; fail clearly if there is no GPU."""
    if use_gpu:
        if not paddle.device.is_compiled_with_cuda():
            raise RuntimeError("use_gpu is set but this Paddle build has no CUDA support; "
                               "install paddlepaddle-gpu (see README) or set use_gpu=false")
        # Under the launcher each worker sees its own card (FLAGS_selected_gpus); 'gpu' means that one.
        return paddle.set_device("gpu")
    return paddle.set_device("cpu")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and Paddle."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
