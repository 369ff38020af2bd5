"""The ONNX engine: logits of a padded batch from an ONNX export, run by ONNX Runtime on the CPU.

``python -m pipeline.export --format onnx [--quantize int8]`` writes the model
(``pipeline.onnx_export``); ``OnnxEngine`` takes the place of the Paddle engines
(``pipeline.engines``) under the same ``TokenLabeller``, so windows, stitching and
decoding are theirs. At float32 it gives their labels; the int8 model's weights are
quantised, so a few labels may differ (``bench/predict_throughput.py`` counts them).
The int8 model quantises activations with one scale per batch (ONNX Runtime's
dynamic quantisation), so a text's int8 labels can also change with the texts
batched beside it (another ``--workers`` split, batch size or chunk): with
``--batch_size 1`` every window runs alone and its labels are its own.

onnxruntime is an optional dependency (``requirements-onnx.txt``): it is imported
only when an ONNX engine is built, and its absence is said in one line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .predictor import EngineUnavailable
from .static_export import ONNX_MODEL_FILE, export_precision_of, read_export_meta

INSTALL_HINT = ("install it with: .venv/bin/pip install -r requirements-onnx.txt "
                "(or NERPIPE_ONNX=1 bash scripts/setup.sh)")
# ONNX Runtime's warnings at load (unused constants paddle2onnx leaves in the graph) tell a user nothing.
ORT_LOG_ERRORS_ONLY = 3


def import_onnxruntime():
    """The onnxruntime module, or EngineUnavailable saying how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise EngineUnavailable(f"the onnx engine needs onnxruntime, which is not installed ({error}); "
                                f"{INSTALL_HINT}") from None
    return onnxruntime


def session_options(onnxruntime, threads: int):
    """ONNX Runtime's options for one prediction process: ``threads`` for each operator, one operator at a time."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # Operators of one transformer layer depend on each other: running several at once only splits the cores.
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = ORT_LOG_ERRORS_ONLY
    return options


class OnnxEngine:
    """Logits of a padded batch from ``export_dir/model.onnx``, run by ONNX Runtime's CPU provider.

    ``threads``: ONNX Runtime's threads per operator (default: what ``pipeline.cpu_env`` set for this
    process, as for Paddle Inference). ``transitions``: the CRF's, from the export or its checkpoint.
    """

    name = "onnx"

    def __init__(self, export_dir, threads: int | None = None, transitions: np.ndarray | None = None):
        from .engines import cpu_threads

        onnxruntime = import_onnxruntime()
        self.export_dir = Path(export_dir)
        meta = read_export_meta(self.export_dir) or {}
        self._transitions = transitions
        self.options = {"threads": threads or cpu_threads(), "precision": export_precision_of(meta),
                        "onnxruntime": onnxruntime.__version__}
        self.session = onnxruntime.InferenceSession(str(self.export_dir / ONNX_MODEL_FILE),
                                                    session_options(onnxruntime, self.options["threads"]),
                                                    providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[batch, seq]`` int64 piece ids (padded with the tokenizer's pad id) -> ``[batch, seq, labels]``."""
        feed = {self.input_name: np.ascontiguousarray(input_ids, dtype=np.int64)}
        return self.session.run([self.output_name], feed)[0].astype(np.float32, copy=False)

    def transitions(self) -> np.ndarray | None:
        """The CRF's transition scores, given at construction (an export computes only the emissions)."""
        return self._transitions
