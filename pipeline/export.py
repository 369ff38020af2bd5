"""Export a checkpoint's token classifier for serving: a static model for Paddle Inference, or ONNX.

    python -m pipeline.export --checkpoint outputs/msra_quick/best_model                      # -> best_model/inference
    python -m pipeline.export --checkpoint outputs/msra_quick/best_model --format onnx        # -> best_model/onnx
    python -m pipeline.export --checkpoint outputs/msra_quick/best_model --format onnx --quantize int8  # -> onnx_int8

--format paddle (the default) writes ``inference.json`` (or ``inference.pdmodel``
with the legacy IR) and ``inference.pdiparams`` with ``paddle.jit.save``;
--format onnx writes ``model.onnx`` (paddle2onnx; with --quantize int8, its
matrix products' weights quantised by ONNX Runtime, which --format onnx needs:
requirements-onnx.txt). One input, ``input_ids`` int64 ``[batch, seq]`` (any
batch size and length up to the encoder's position table), one output, the
logits ``[batch, seq, classes]``. Padding is read from ``input_ids`` by the
encoder itself, as in the dynamic graph.

Beside the model ``export.json`` records the sha256 of the checkpoint's
``model.pdparams`` (and ``pipeline.checkpoint.weights_digest``), so that a
predictor can tell an export made from other weights (a stale one) and refuse
it, and the labels, window length, text unit, decoding and CRF transitions; the
tokenizer's files and ``char_mapping.json`` are copied too, so the directory
alone can serve: ``predict.py --checkpoint EXPORT_DIR``. Without --output, the
export goes where ``predict.py`` looks for it beside the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import OneLineErrorParser
from .onnx_export import QUANTIZATIONS  # imports neither Paddle nor ONNX at the top
from .static_export import EXPORT_FORMATS, EXPORT_META_FILE, export_dir_name


def build_parser() -> argparse.ArgumentParser:
    """The export CLI's flags; the choice lists belong to pipeline.static_export and pipeline.onnx_export."""
    parser = OneLineErrorParser(prog="python -m pipeline.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best_model/ directory written by train_dist.py")
    parser.add_argument("--output", default=None,
                        help="directory to write (default: CHECKPOINT/inference, CHECKPOINT/onnx or "
                             "CHECKPOINT/onnx_int8, which predict.py finds by itself)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                        help="paddle: a static model for Paddle Inference (predict.py --engine static); onnx: "
                             "model.onnx for ONNX Runtime or any ONNX runtime (predict.py --engine onnx)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="int8: weights of the matrix products in int8 (ONNX Runtime's dynamic quantisation; "
                             "--format onnx only; predict.py --precision int8)")
    # Per channel by default: on the main job's model (whole dev split) one scale per weight cost 0.54
    # points of F1 against float32, one per output column none (+0.12); BENCHMARKS.md has the speeds.
    parser.add_argument("--per_tensor", action="store_true",
                        help="with --quantize: one scale per weight instead of one per output column (the default)")
    parser.add_argument("--per_channel", action="store_true",
                        help="with --quantize: one scale per output column of each weight (the default; accepted "
                             "for commands written before it was)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quantize and args.format != "onnx":
        # Paddle Inference's CPU int8 runs a program calibrated on sample inputs (post-training quantisation)
        # under oneDNN, which the static engine keeps off (README, "Prediction"): not made here.
        parser.error(f"--quantize {args.quantize} needs --format onnx (Paddle Inference's CPU int8 needs a "
                     f"calibrated model and oneDNN)")
    for flag in ("per_channel", "per_tensor"):
        if getattr(args, flag) and not args.quantize:
            parser.error(f"--{flag} is an option of --quantize int8")
    if args.per_channel and args.per_tensor:
        parser.error("--per_channel and --per_tensor exclude each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from .cpu_env import apply_cpu_settings

    apply_cpu_settings()  # before Paddle is imported
    from .checkpoint import CheckpointError
    from .predictor import EngineUnavailable

    precision = args.quantize or "fp32"
    output = Path(args.output) if args.output else Path(args.checkpoint) / export_dir_name(args.format, precision)
    try:
        if args.format == "onnx":
            from .onnx_export import OnnxExportError, export_onnx_model

            try:
                written = export_onnx_model(args.checkpoint, output, quantize=args.quantize,
                                            per_channel=not args.per_tensor)
            except OnnxExportError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        else:
            from .static_export import export_inference_model

            written = export_inference_model(args.checkpoint, output)
    except (CheckpointError, EngineUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {written} ({args.format} {precision}; meta: {written / EXPORT_META_FILE})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
