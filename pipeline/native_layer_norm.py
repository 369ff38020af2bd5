"""Layer normalisation from our own C++ operator, for CPU training in float32.

Paddle 3.3.1's CPU ``layer_norm`` and ``layer_norm_grad`` kernels take 2.69 ms together for one
[16, 46, 512] activation on the machines we measure, nine calls a training step of m3e-small; the loops of
``native/layer_norm.cc`` take 0.24 ms (``python -m bench.op_costs``; BENCHMARKS.md, 2026-12-08). Same
formula as Paddle's (biased variance, epsilon inside the root); sums in another order, so outputs differ
in the last bits.

The operator is compiled once per machine and source with ``paddle.utils.cpp_extension`` (g++, about
20 s) into ``native/<key>`` of the asset cache (``$NERPIPE_HOME``, else ``~/.cache/nerpipe``). The key
covers the source, the flags, Paddle's version and the processor's instruction sets, since the code is
built for the processor that builds it (a cache shared by different machines gets one build each).
Workers that start together take a file lock, so one compiles and the others load its build. Without a
compiler, or if the build fails, training warns once and keeps Paddle's layer norm.

Installed by the trainer for CPU float32 training only (``native_layer_norm``): every ``nn.LayerNorm`` of
the model over one dimension, with weight and bias, gets a forward that uses the operator in training
mode; in evaluation mode (dev and test scoring, export, prediction) it is Paddle's ``LayerNorm``, so saved
weights, exported programs and predict.py do not depend on the operator.
"""
from __future__ import annotations

import hashlib
import logging
import os
import types
from pathlib import Path

import filelock
import paddle
from paddle import nn

from .asset_cache import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "layer_norm.cc"
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]  # vectorised sums; no OpenMP threads beside MKL's
_UNTRIED = object()
_ops = _UNTRIED  # the loaded operator module, None when it could not be built


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return os.uname().machine


def build_directory() -> Path:
    """Where this machine's build of this source lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CXX_FLAGS).encode(), paddle.__version__.encode(),
                 _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    return default_cache_dir() / "native" / key.hexdigest()[:16]


def _build_and_load(directory: Path):
    from paddle.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(directory / "build.lock"):  # the first worker compiles; the others wait, then load its build
        if not (directory / "built").exists():
            logger.info("compiling the native layer norm into %s (once per machine, about 20 s)", directory)
        module = load(name="nerpipe_layer_norm", sources=[str(SOURCE)], extra_cxx_cflags=CXX_FLAGS,
                      build_directory=str(directory))
        (directory / "built").touch()
    return module


def native_ops():
    """The compiled operator module, or None (after one warning) when it cannot be built here."""
    global _ops
    if _ops is _UNTRIED:
        try:
            _ops = _build_and_load(build_directory())
        except Exception as error:  # no compiler, no headers, a failed build: Paddle's kernel still works
            logger.warning("native layer norm unavailable (%s: %s); using Paddle's layer norm",
                           type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "")
            _ops = None
    return _ops


def layer_norm(x, weight, bias, epsilon: float):
    """Layer norm over the last dimension of a float32 CPU tensor, with the operator's gradient.

    The first call builds or loads the operator: make it (or ``native_ops()``) outside to_static, as
    ``install_native_layer_norm`` does, since SOT cannot trace the loading code.
    """
    ops = _ops if _ops is not _UNTRIED else native_ops()
    y, _mean, _rstd = ops.ner_layer_norm(x, weight, bias, float(epsilon))
    return y


def _layer_norm_forward(self, input):
    if self.training and input.dtype == paddle.float32:
        return layer_norm(input, self.weight, self.bias, self._epsilon)
    return nn.LayerNorm.forward(self, input)


def install_native_layer_norm(model) -> int:
    """Give ``model``'s one-dimensional layer norms with weight and bias the forward above; return how many.

    0 when the operator cannot be built on this machine (then nothing changes).
    """
    layers = [layer for layer in model.sublayers(include_self=True)
              if type(layer) is nn.LayerNorm and len(layer._normalized_shape) == 1
              and layer.weight is not None and layer.bias is not None]
    if not layers or native_ops() is None:
        return 0
    for layer in layers:
        layer.forward = types.MethodType(_layer_norm_forward, layer)
    return len(layers)
