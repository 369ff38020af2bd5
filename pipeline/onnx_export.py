"""ONNX export: a checkpoint's token classifier as ``model.onnx``, float32 or int8, in a directory that serves alone.

The static program ``pipeline.static_export`` writes for Paddle Inference is
converted by paddle2onnx (PaddlePaddle's own converter, a dependency of
PaddleNLP); the output is renamed ``logits``. ``--quantize int8`` then quantises
the weights of every matrix product with a constant weight (the encoder's
linear layers and the classifier) by ONNX Runtime's dynamic quantisation: int8
weights, activations quantised per batch at run time, no calibration data. The
weights use 7 bits (``reduce_range``): without VNNI (AVX2 here), ONNX Runtime's
u8 x s8 kernel adds pairs of products in 16 bits, which saturates with 8-bit
weights (ONNX Runtime's quantisation guide; on the tiny trained test model the
largest logit error fell from 0.20 to 0.016).

Every export is checked before it is put in place: ONNX Runtime runs a probe
batch and its logits are compared with the checkpoint's dynamic graph. A
float32 model that differs by more than ``FP32_TOLERANCE`` is refused; an int8
model's difference is recorded in ``export.json`` (``check``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .files import atomic_directory
from .static_export import INPUT_NAME, ONNX_MODEL_FILE, OUTPUT_NAME, load_for_export, save_static_program, write_export

QUANTIZATIONS = ("int8",)  # python -m pipeline.export --quantize
# ONNX opset 17 has LayerNormalization as one operator; ONNX Runtime has run it since 1.12.
OPSET = 17
FP32_TOLERANCE = 1e-3  # largest logit difference from the dynamic graph a float32 export may show
PROBE_SHAPE = (4, 24)  # the check's batch: rows x pieces, the last rows padded


class OnnxExportError(RuntimeError):
    """The ONNX conversion, quantisation or check failed."""


def _convert(program: Path, params: Path) -> "onnx.ModelProto":  # noqa: F821
    """paddle2onnx's ONNX model of a static program, its logits output renamed ``OUTPUT_NAME``."""
    # paddle2onnx's default clean-up (polygraphy) sets POLYGRAPHY_AUTOINSTALL_DEPS=1, which lets polygraphy pip-install
    # packages of its own choosing into this environment; onnxoptimizer (installed with paddle2onnx) installs nothing.
    os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
    import onnx
    import paddle2onnx

    try:
        serialized = paddle2onnx.export(str(program), str(params), save_file=None, opset_version=OPSET,
                                        auto_upgrade_opset=True, enable_onnx_checker=True,
                                        optimize_tool="onnxoptimizer")
    except Exception as error:  # paddle2onnx logs its own error, then fails on the result it never made
        raise OnnxExportError(f"paddle2onnx {paddle2onnx.__version__} could not convert {program}: "
                              f"{type(error).__name__}: {error}") from error
    model = onnx.load_from_string(serialized)
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise OnnxExportError(f"paddle2onnx gave {len(model.graph.input)} inputs and {len(model.graph.output)} "
                              f"outputs; expected {INPUT_NAME} -> logits")
    old_name = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [OUTPUT_NAME if name == old_name else name for name in node.output]
    model.graph.output[0].name = OUTPUT_NAME
    onnx.checker.check_model(model)
    return model


def _quantize_int8(fp32_file: Path, int8_file: Path, work: Path, per_channel: bool) -> dict:
    """Dynamic int8 quantisation of ``fp32_file``'s constant-weight MatMuls; what was done, for export.json."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_engine import ORT_LOG_ERRORS_ONLY

    onnxruntime.set_default_logger_severity(ORT_LOG_ERRORS_ONLY)  # the pre-processing's session warns as at load

    # paddle2onnx feeds weights through Constant/Identity nodes, which the quantiser does not take for weights:
    # ONNX Runtime's pre-processing folds them into initializers. Its symbolic shape pass (needs sympy) is skipped:
    # ONNX's own shape inference still runs.
    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(int8_file), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=per_channel, reduce_range=True)
    operators = [node.op_type for node in onnx.load(str(int8_file)).graph.node]
    quantized = operators.count("MatMulInteger") + operators.count("DynamicQuantizeMatMul")
    if quantized == 0:
        raise OnnxExportError("onnxruntime's quantize_dynamic quantised no MatMul: the model is unchanged, "
                              "so it would not be int8")
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8", "activations": "uint8, per batch",
            "reduce_range": True, "per_channel": per_channel, "quantized_matmuls": quantized,
            "float_matmuls": operators.count("MatMul")}


def _probe_ids(vocab_size: int, pad_id: int) -> np.ndarray:
    """A fixed batch of piece ids: random non-pad pieces, the later rows shorter and padded."""
    rows, length = PROBE_SHAPE
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=PROBE_SHAPE)
    ids[ids == pad_id] = (pad_id + 1) % vocab_size
    for row in range(rows):
        ids[row, length - row * (length // (2 * rows)):] = pad_id
    return ids.astype(np.int64)


def _check(model_file: Path, bundle, precision: str) -> dict:
    """ONNX Runtime's logits on the probe batch against the dynamic graph's; refuses a float32 model that differs."""
    from .engines import DynamicEngine
    from .onnx_engine import OnnxEngine

    tokenizer = bundle.tokenizer
    ids = _probe_ids(tokenizer.vocab_size, tokenizer.pad_token_id)
    expected = DynamicEngine(bundle.model).logits(ids)
    got = OnnxEngine(model_file.parent, threads=1).logits(ids)
    difference = float(np.abs(got - expected).max())
    if precision == "fp32" and not difference <= FP32_TOLERANCE:
        raise OnnxExportError(f"the ONNX model's logits differ from the checkpoint's by up to {difference:.3g} "
                              f"(tolerance {FP32_TOLERANCE}): not exported")
    same_argmax = float((got.argmax(-1) == expected.argmax(-1)).mean())
    return {"probe_shape": list(PROBE_SHAPE), "max_abs_logit_difference": difference,
            "largest_logit": float(np.abs(expected).max()), "same_argmax_share": same_argmax}


def export_onnx_model(checkpoint_dir, output_dir, quantize: str | None = None, per_channel: bool = True) -> Path:
    """Write ``model.onnx`` (float32, or int8 with ``quantize='int8'``), ``export.json`` and the serving files for
    ``checkpoint_dir`` into ``output_dir``, atomically; return it."""
    import onnx
    import paddle2onnx

    from .onnx_engine import import_onnxruntime

    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    onnxruntime = import_onnxruntime()  # the quantiser and the check need it: fail before any work
    precision = quantize or "fp32"
    bundle, weights_sha256 = load_for_export(checkpoint_dir)
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="onnx_export_") as work, atomic_directory(output_dir) as temporary:
        work = Path(work)
        program, params = save_static_program(bundle.model, work)
        model = _convert(program, params)
        fields = {"format": "onnx", "precision": precision, "model_file": ONNX_MODEL_FILE,
                  "opset": max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
                  "paddle2onnx_version": paddle2onnx.__version__, "onnx_version": onnx.__version__,
                  "onnxruntime_version": onnxruntime.__version__}
        if quantize == "int8":
            fp32_file = work / "fp32.onnx"
            onnx.save(model, str(fp32_file))
            fields["quantization"] = _quantize_int8(fp32_file, temporary / ONNX_MODEL_FILE, work, per_channel)
        else:
            onnx.save(model, str(temporary / ONNX_MODEL_FILE))
        fields["check"] = _check(temporary / ONNX_MODEL_FILE, bundle, precision)
        write_export(temporary, checkpoint_dir, bundle, weights_sha256, **fields)
    return output_dir
