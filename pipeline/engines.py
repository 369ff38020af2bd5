"""Engines: what turns a padded ``[batch, seq]`` int64 array of piece ids into logits.

Evaluation and prediction share everything else (windows, batches, decoding:
``pipeline.labeller``); only this step differs. ``DynamicEngine`` runs a
dynamic-graph token classifier, as training evaluates it; ``StaticEngine`` runs
a static model exported by ``python -m pipeline.export`` through Paddle
Inference, whose settings live here too. Any object with ``logits`` and
``transitions`` (the ``Engine`` protocol) can take their place.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import paddle
from paddle import inference

from .checkpoint import CheckpointError
from .static_export import INPUT_NAME, model_files
from .heads import transitions_of
from .models import token_logits
from .predictor import precision_problem

# Each new input shape is a oneDNN cache entry; batch shapes vary with their longest text, so bound it.
ONEDNN_CACHE_CAPACITY = 64
GPU_MEMORY_POOL_MB = 256  # Paddle Inference's initial GPU memory pool; it grows as needed
# predictor.PRECISIONS' names as Paddle Inference's GPU precision modes.
GPU_PRECISION_MODES = {"fp32": inference.PrecisionType.Float32, "fp16": inference.PrecisionType.Half}


class Engine(Protocol):
    """What ``TokenLabeller`` needs from an engine."""

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[batch, seq]`` int64 piece ids (padded with the tokenizer's pad id) -> ``[batch, seq, labels]``."""

    def transitions(self) -> np.ndarray | None:
        """The CRF's transition scores ``[previous, next]``, or None for the linear head."""


class DynamicEngine:
    """Logits of a padded batch from a dynamic-graph token classifier (``paddle.nn.Layer``), in the
    parameters' own precision, never under autocast: evaluation during training runs it on float32
    weights (``AmpPolicy.float32_weights``), so that its labels are predict.py's."""

    name = "dynamic"

    def __init__(self, model: paddle.nn.Layer):
        self.model = model

    @paddle.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[batch, seq]`` int64 piece ids (padded with the tokenizer's pad id) -> ``[batch, seq, labels]``."""
        was_training = self.model.training
        self.model.eval()
        try:
            logits = token_logits(self.model, paddle.to_tensor(input_ids))
            return logits.astype("float32").numpy()
        finally:
            if was_training:
                self.model.train()

    def transitions(self) -> np.ndarray | None:
        """The CRF's current transition scores, or None for the linear head (read anew: training moves them)."""
        return transitions_of(self.model)


def cpu_threads(environ=os.environ) -> int:
    """Threads for Paddle Inference's math library: what ``pipeline.cpu_env`` put in the environment."""
    for name in ("FLAGS_paddle_num_threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            value = int(environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return 1


def current_gpu_id() -> int:
    """The card ``paddle.set_device('gpu')`` chose for this process (under the launcher, FLAGS_selected_gpus')."""
    return int(paddle.get_device().split(":")[1])


def paddle_inference_config(program_file, params_file, use_gpu: bool, threads: int, onednn: bool, ir_optim: bool,
                            memory_optim: bool, precision: str = "fp32") -> inference.Config:
    """Paddle Inference's ``Config`` for an exported model, with ``StaticEngine``'s options applied."""
    config = inference.Config(str(program_file), str(params_file))
    if use_gpu:
        # Paddle Inference's own default is card 0: the process's card is the one Paddle was placed on.
        config.enable_use_gpu(GPU_MEMORY_POOL_MB, current_gpu_id(), GPU_PRECISION_MODES[precision])
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        if onednn:
            config.enable_onednn()
            config.set_onednn_cache_capacity(ONEDNN_CACHE_CAPACITY)
        else:
            config.disable_onednn()
    config.switch_ir_optim(ir_optim)
    if memory_optim:
        config.enable_memory_optim()
    config.disable_glog_info()
    return config


class StaticEngine:
    """Logits of a padded batch from an exported static model, run by Paddle Inference.

    ``onednn`` (MKLDNN), ``ir_optim`` (operator fusion) and ``memory_optim``
    (buffer reuse) are Paddle Inference's CPU options; every combination gives
    the dynamic graph's labels. oneDNN is off because it caches kernels per input
    shape and every batch has its own length, so its small speed-up costs several
    times the memory (BENCHMARKS.md); the other two keep Paddle Inference's own
    defaults. ``precision``: one of ``predictor.PRECISIONS`` for the device ('fp16' on a GPU: Paddle
    Inference's mixed precision, float32 inputs and outputs).
    """

    name = "static"

    def __init__(self, inference_dir, use_gpu: bool = False, threads: int | None = None,
                 onednn: bool = False, ir_optim: bool = True, memory_optim: bool = False,
                 transitions: np.ndarray | None = None, precision: str = "fp32"):
        problem = precision_problem(precision, "gpu" if use_gpu else "cpu", self.name)
        if problem:
            raise ValueError(problem)
        files = model_files(inference_dir)
        if files is None:
            raise CheckpointError(f"no static model in {inference_dir}: run python -m pipeline.export first")
        self.inference_dir = Path(inference_dir)
        self._transitions = transitions  # the checkpoint's CRF transitions; None for the linear head
        self.options = {"onednn": onednn, "ir_optim": ir_optim, "memory_optim": memory_optim,
                        "threads": threads or cpu_threads(), "use_gpu": use_gpu, "precision": precision}
        self.predictor = inference.create_predictor(paddle_inference_config(*files, **self.options))
        self.input = self.predictor.get_input_handle(INPUT_NAME)
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[batch, seq]`` int64 piece ids (padded with the tokenizer's pad id) -> ``[batch, seq, labels]``."""
        self.input.reshape(list(input_ids.shape))
        self.input.copy_from_cpu(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.predictor.run()
        return self.output.copy_to_cpu().astype(np.float32, copy=False)  # fp16 runs may return half logits

    def transitions(self) -> np.ndarray | None:
        """The checkpoint's CRF transitions, given at construction (an export holds only the emissions)."""
        return self._transitions
