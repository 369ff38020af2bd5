"""Batch NER prediction from a saved checkpoint directory.

    python predict.py --checkpoint outputs/msra_ner/best_model --input texts.txt --output out.jsonl

Input: plain text (one text per line), JSONL with a "text" field (by the .jsonl
extension or --input_format jsonl), or '-' for standard input. Output: one JSON
line per input line, in order: {"text", "labels" (one per character), "entities"}.
Empty and whitespace-only lines give an empty result; long lines are windowed.
Bytes that are not UTF-8 are replaced with U+FFFD and reported with their line
numbers on standard error; such a line is still predicted, never dropped.
A JSONL line that cannot be used (not JSON, no string "text") gives the output
line {"line", "error"} in its place and is reported on standard error; the
other lines are predicted as usual and the exit status stays 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.device import DeviceError, add_device_arguments, prepare_process, use_gpu_of
from pipeline.prediction_io import CHUNK_LINES, INPUT_FORMATS, STDIO, output_problem, predict_file
from pipeline.predict_workers import WorkerDied
from pipeline.predictor import (ALL_PRECISIONS, ENGINES, EngineUnavailable, Predictor, precision_problem,
                                precision_summary)


def build_parser() -> argparse.ArgumentParser:
    """predict.py's flags; the choice lists belong to the modules that use them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a best_model/ directory written by train_dist.py, or an export directory written by "
                             "python -m pipeline.export (then its engine runs it)")
    parser.add_argument("--input", required=True, help="text or JSONL file, or - for standard input")
    parser.add_argument("--output", default="-", help="JSONL file to write, or - for standard output")
    parser.add_argument("--input_format", choices=INPUT_FORMATS, default="auto")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="window length in tokens (default: the training one); longer texts are windowed")
    add_device_arguments(parser)
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="static: the model exported by python -m pipeline.export, run by Paddle Inference; "
                             "onnx: its --format onnx export, run by ONNX Runtime (CPU); dynamic: the checkpoint's "
                             "weights in the dynamic graph; auto (default): static when an export of the "
                             "checkpoint's current weights is found, else dynamic with a warning; with a reduced "
                             "--precision, the engine that has it")
    parser.add_argument("--precision", choices=ALL_PRECISIONS, default=None,
                        help="arithmetic (default fp32, or an export directory's own): " + precision_summary()
                        + " (int8: the export of --format onnx --quantize int8)")
    parser.add_argument("--workers", type=int, default=1,
                        help="prediction processes, each with cores/N CPU threads and its own copy of the model "
                             "(default 1; on CPU 2+ keeps all cores busy, see BENCHMARKS.md)")
    parser.add_argument("--inference_dir", default=None,
                        help="where the exported model is (default: CHECKPOINT/NAME, then CHECKPOINT/../NAME; NAME "
                             "is inference for static, onnx or onnx_int8 for onnx)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        args.use_gpu = use_gpu_of(args)
    except DeviceError as error:
        parser.error(str(error))
    if args.workers > 1:
        if args.use_gpu == "true":
            parser.error("--workers is for CPU prediction; on GPUs run one process per GPU")
        args.use_gpu = "false"  # several workers share the CPU's cores
    if args.use_gpu != "auto":  # with auto the device is known only in main()
        problem = precision_problem(args.precision, "gpu" if args.use_gpu == "true" else "cpu", args.engine)
        if problem:
            parser.error(problem)
    if args.max_seq_len is not None and args.max_seq_len < 8:
        parser.error("--max_seq_len must be >= 8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = prepare_process(args.use_gpu)  # before Paddle is imported; CPU settings only on CPU
    except (DeviceError, ValueError) as error:  # no GPU for --device gpu, a bad NERPIPE_MALLOC
        print(f"error: {error}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from pipeline.checkpoint import CheckpointError
    from pipeline.runtime import set_device

    if args.input != STDIO and not Path(args.input).is_file():
        print(f"error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    problem = output_problem(args.input, args.output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        device = set_device(device)  # Paddle's own word on the GPU
        problem = precision_problem(args.precision, device.kind, args.engine)
        if problem:
            raise DeviceError(problem)
    except DeviceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"device: {device.kind} ({device.reason})", file=sys.stderr)
    options = dict(directory=args.checkpoint, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                   use_gpu=device.is_gpu, engine=args.engine, inference_dir=args.inference_dir,
                   precision=args.precision)
    predictor = None
    try:
        if args.workers > 1:
            from pipeline.predict_workers import ParallelPredictor

            predictor = ParallelPredictor(args.workers, **options)
            predictor.start()  # every worker loads the model now: a bad checkpoint fails before any input is read
        else:
            predictor = Predictor.from_checkpoint(**options)
    except (CheckpointError, EngineUnavailable) as error:
        if predictor is not None and args.workers > 1:
            predictor.close()
        print(f"error: {error}", file=sys.stderr)
        return 2

    progress = tqdm(desc="predict", unit="line", disable=args.output == STDIO, mininterval=2)
    try:
        # Each worker gets about CHUNK_LINES lines of every chunk.
        report = predict_file(predictor, args.input, args.output, args.input_format,
                              chunk_lines=CHUNK_LINES * args.workers, progress=progress.update)
    except WorkerDied as error:
        print(f"error: {error}", file=sys.stderr)
        return 1  # a resource failure, worth retrying (unlike 2, bad input)
    finally:
        progress.close()
        if args.workers > 1:
            predictor.close()
    for message in report.messages():
        print(message, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
