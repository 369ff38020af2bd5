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

A stop signal (SIGTERM, SIGINT, SIGUSR1: a scheduler's pre-emption or time-limit warning, Ctrl-C) ends
the run after the chunk in flight is written, with exit status 75 ("relaunch me"): the same command
continues after it. A second signal more than 2 s later ends it at once; the output stays resumable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.device import DeviceError, add_device_arguments, prepare_process, use_gpu_of
from pipeline.files import not_a_file
from pipeline.prediction_io import (CHUNK_LINES, INPUT_FORMATS, STDIO, PredictionStopped, count_lines, output_problem,
                                    predict_file, prediction_identity, resolve_input_format, start_prediction)
from pipeline.predict_workers import WorkerDied
from pipeline.stop_signals import RELAUNCH_EXIT_CODE, catch_stop_signals, ignore_stop_signals
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
                             "weights in the dynamic graph; auto (default): on CPU onnx when ONNX Runtime "
                             "is installed and a current --format onnx export is found (the faster engine, same "
                             "labels), else static when an export of the checkpoint's current weights is found, "
                             "else dynamic with a warning; with a reduced --precision, the engine that has it")
    parser.add_argument("--precision", choices=ALL_PRECISIONS, default=None,
                        help="arithmetic (default fp32, or an export directory's own): " + precision_summary()
                        + " (int8: the export of --format onnx --quantize int8)")
    parser.add_argument("--workers", type=int, default=1,
                        help="prediction processes, each with cores/N CPU threads and its own copy of the model "
                             "(default 1; on CPU 2+ keeps all cores busy, see BENCHMARKS.md)")
    parser.add_argument("--chunk_lines", type=int, default=CHUNK_LINES,
                        help=f"lines read, predicted and committed to the output at a time, per process (default "
                             f"{CHUNK_LINES}); an interrupted run redoes at most one chunk")
    parser.add_argument("--overwrite", action="store_true",
                        help="start anew over an unfinished OUTPUT.partial, even one made from another input, "
                             "checkpoint or settings (without it such an output is refused)")
    parser.add_argument("--inference_dir", default=None,
                        help="where the exported model is (default: CHECKPOINT/NAME, then CHECKPOINT/../NAME; NAME "
                             "is inference for static, onnx or onnx_int8 for onnx)")
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None):
    """predict.py's flags, checked; ``parser`` (default ``build_parser()``) reports what is wrong: the job
    renderer (``pipeline.jobs``) passes one whose ``error`` raises, to check a job's flags the same way."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.chunk_lines < 1:
        parser.error("--chunk_lines must be >= 1")
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


def launch_problem(args, world_size: int) -> str | None:
    """Why these flags cannot run under ``paddle.distributed.launch`` with ``world_size`` ranks, or None."""
    if world_size == 1:
        return None
    if args.workers > 1:
        # Each rank already has its share of the cores (pipeline.cpu_env); workers inside ranks would oversubscribe.
        return (f"--workers {args.workers} under paddle.distributed.launch: the launcher's ranks already are the "
                f"prediction processes; use --nproc_per_node N (CPU) or --gpus instead of --workers")
    if STDIO in (args.input, args.output):
        return "under paddle.distributed.launch --input and --output must be files, not - (standard input/output)"
    return None


def prepare_run(args):
    """Rank 0's checks before any model is loaded: the input, the output, the checkpoint, an unfinished output."""
    from pipeline.checkpoint import read_meta
    from pipeline.static_export import is_export_dir, read_standalone_export

    problem = None if args.input == STDIO else not_a_file(args.input)
    if problem:
        raise ValueError(f"input file {args.input} {problem}")
    problem = output_problem(args.input, args.output)
    if problem:
        raise ValueError(problem)
    # A missing or damaged checkpoint (or export directory, which serves alone) is named as such, before its
    # fingerprint is taken.
    if is_export_dir(args.checkpoint):
        read_standalone_export(args.checkpoint)
    else:
        read_meta(args.checkpoint)
    # What changes the output lines (--batch_size, --engine, --workers and the ranks do not).
    settings = {"input_format": resolve_input_format(args.input_format, args.input),
                "max_seq_len": args.max_seq_len, "precision": args.precision}
    identity = prediction_identity(args.input, args.checkpoint, settings) if args.output != STDIO else None
    return start_prediction(args.input, args.output, args.input_format, identity, args.overwrite)


def load_predictor(args, device):
    """This process's predictor (every worker of --workers started), or raise CheckpointError."""
    options = dict(directory=args.checkpoint, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                   use_gpu=device.is_gpu, engine=args.engine, inference_dir=args.inference_dir,
                   precision=args.precision)
    if args.workers == 1:
        return Predictor.from_checkpoint(**options)
    from pipeline.predict_workers import ParallelPredictor

    predictor = ParallelPredictor(args.workers, **options)
    try:
        predictor.start()  # every worker loads the model now: a bad checkpoint fails before any input is read
    except BaseException:
        predictor.close()
        raise
    return predictor


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = prepare_process(args.use_gpu)  # before Paddle is imported; CPU settings only on CPU
    except (DeviceError, ValueError) as error:  # no GPU for --device gpu, a bad NERPIPE_MALLOC
        print(f"error: {error}", file=sys.stderr)
        return 2
    from pipeline import dist
    from pipeline.checkpoint import CheckpointError
    from pipeline.files import ResumeRefused
    from pipeline.runtime import set_device

    problem = launch_problem(args, dist.launched_world_size())
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
    dist.init_distributed(device.is_gpu)
    main_process = dist.is_main_process()
    run = None
    if main_process:  # only rank 0 reads the input and writes the output: other nodes need neither
        try:
            run = prepare_run(args)
        except (ValueError, OSError, CheckpointError) as error:  # ResumeRefused is a ValueError
            problem = str(error)
            if isinstance(error, ResumeRefused):
                problem += "; rerun with --overwrite to start over"
    problem = dist.broadcast_object(problem)  # every rank stops on rank 0's refusal
    if problem:
        if main_process:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if main_process:
        print(f"device: {device.kind} ({device.reason})", file=sys.stderr)
    predictor = None
    try:
        predictor = load_predictor(args, device)
    except (CheckpointError, EngineUnavailable) as error:
        problem = f"error: {error}" + (f" (rank {dist.get_rank()})" if dist.get_world_size() > 1 else "")
    problems = [p for p in dist.all_gather_objects(problem) if p]  # a checkpoint one node lacks stops every rank
    if problems:
        if main_process:
            print(problems[0], file=sys.stderr)
        return 2
    with catch_stop_signals() as stop:
        if dist.get_world_size() > 1:
            from pipeline.predict_workers import RankPredictor

            predictor = RankPredictor(predictor, stop_requested=lambda: stop.requested)
            if not main_process:  # rank 0 decides when to stop, from every rank's request
                stopped = predictor.serve()
                if stopped:
                    ignore_stop_signals()  # the launcher stops the ranks still alive: keep this exit code
                dist.shutdown()
                return RELAUNCH_EXIT_CODE if stopped else 0
        return predict_on_main_process(args, run, predictor, stop)


def predict_on_main_process(args, run, predictor, stop) -> int:
    """Rank 0 (or the only process): predict the input into the output with a progress bar; the summary.
    ``stop``: the ``StopRequest`` of this process's stop signals (other ranks' come with each chunk)."""
    from tqdm import tqdm

    from pipeline import dist

    if run.done:
        print(f"continuing {run.output.partial} after its line {run.done} "
              f"(--overwrite starts over)", file=sys.stderr)
    total = count_lines(args.input) if args.input != STDIO else None  # one cheap pass: the bar's ETA
    progress = tqdm(desc="predict", unit="line", total=total, initial=run.done, disable=args.output == STDIO,
                    mininterval=2, dynamic_ncols=True)
    stopped = False

    def should_stop() -> bool:
        return stop.requested or getattr(predictor, "stop_seen", False)  # RankPredictor: any rank's signal

    try:
        # Each worker or rank gets about chunk_lines lines of every chunk.
        report = predict_file(predictor, run, chunk_lines=args.chunk_lines * args.workers * dist.get_world_size(),
                              progress=progress.update, should_stop=should_stop)
    except WorkerDied as error:
        unfinished = (f"; {run.output.partial} is unfinished: rerun the same command to continue after line "
                      f"{run.output.recorded_lines()}") if run.output else "; the output is incomplete"
        print(f"error: {error}{unfinished}", file=sys.stderr)
        return 1  # a resource failure, worth retrying (unlike 2, bad input)
    except PredictionStopped as error:
        stopped = True
        why = stop.signal_name or "another rank's stop signal"
        print(f"stopped on {why} after a whole chunk: {error.lines_done} line(s) done"
              + (f" in {run.output.partial}; rerun the same command to continue" if run.output else
                 "; the output is incomplete") + f" (exit {RELAUNCH_EXIT_CODE})", file=sys.stderr)
        ignore_stop_signals()  # the launcher stops the ranks still alive: keep this exit code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the handlers: at once, the output resumable
        print(f"interrupted (SIGINT): {run.output.recorded_lines() if run.output else '?'} line(s) done"
              + (f" in {run.output.partial}; rerun the same command to continue" if run.output else ""),
              file=sys.stderr)
        return 130
    finally:
        progress.close()
        if args.workers > 1:
            predictor.close()  # ends the worker processes, whatever happened here
        elif dist.get_world_size() > 1:
            predictor.close(stopped=stopped)  # releases the other ranks, with the relaunch code if stopped
    if not stopped:
        for message in report.messages():
            print(message, file=sys.stderr)
    dist.shutdown()  # the other ranks wait for this one there, a stopped run's too
    return RELAUNCH_EXIT_CODE if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
