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
import json
import sys
from pathlib import Path

from pipeline.cpu_env import apply_cpu_settings

CHUNK_LINES = 512  # lines read, predicted and written at a time: memory stays flat for any input size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best_model/ directory written by train_dist.py")
    parser.add_argument("--input", required=True, help="text or JSONL file, or - for standard input")
    parser.add_argument("--output", default="-", help="JSONL file to write, or - for standard output")
    parser.add_argument("--input_format", choices=("auto", "text", "jsonl"), default="auto")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="window length in tokens (default: the training one); longer texts are windowed")
    parser.add_argument("--use_gpu", action="store_true")
    parser.add_argument("--engine", choices=("auto", "dynamic", "static"), default="auto",
                        help="static: the model exported by python -m pipeline.export, run by Paddle Inference; "
                             "dynamic: the checkpoint's weights in the dynamic graph; auto (default): static when "
                             "an export of the checkpoint's current weights is found, else dynamic with a warning")
    parser.add_argument("--workers", type=int, default=1,
                        help="prediction processes, each with cores/N CPU threads and its own copy of the model "
                             "(default 1; on CPU 2+ keeps all cores busy, see BENCHMARKS.md)")
    parser.add_argument("--inference_dir", default=None,
                        help="where the exported static model is (default: CHECKPOINT/inference, then "
                             "CHECKPOINT/../inference)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.workers > 1 and args.use_gpu:
        parser.error("--workers is for CPU prediction; with --use_gpu run one process per GPU")
    if args.max_seq_len is not None and args.max_seq_len < 8:
        parser.error("--max_seq_len must be >= 8")
    return args


def read_texts(lines, input_format: str, source: str):
    """Yield ``(line_number, text, had_bad_bytes, error)`` for every input line, in order.

    ``error`` is a message naming the line when it cannot be used (``text`` is then None).
    """
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="replace")
        bad_bytes = "\ufffd" in text and "\ufffd" not in raw.decode("utf-8", errors="ignore")
        text = text.rstrip("\r\n")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if input_format == "jsonl":
            try:
                record = json.loads(text) if text.strip() else {"text": ""}
            except json.JSONDecodeError as error:
                yield number, None, bad_bytes, f"{source}:{number}: not valid JSON ({error.msg})"
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                yield number, None, bad_bytes, f'{source}:{number}: expected an object with a string "text" field'
                continue
            text = record["text"]
        yield number, text, bad_bytes, None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.use_gpu:
        try:
            apply_cpu_settings()  # before Paddle is imported
        except ValueError as error:  # a bad NERPIPE_MALLOC
            print(f"error: {error}", file=sys.stderr)
            return 2
    from tqdm import tqdm

    from pipeline.checkpoint import CheckpointError
    from pipeline.predictor import Predictor

    input_format = args.input_format
    if input_format == "auto":
        input_format = "jsonl" if args.input.endswith(".jsonl") else "text"
    if args.input != "-" and not Path(args.input).is_file():
        print(f"error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    options = dict(directory=args.checkpoint, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                   use_gpu=args.use_gpu, engine=args.engine, inference_dir=args.inference_dir)
    try:
        if args.workers > 1:
            from pipeline.predict_workers import ParallelPredictor

            predictor = ParallelPredictor(args.workers, **options)
            predictor.start()  # every worker loads the model now: a bad checkpoint fails before any input is read
        else:
            predictor = Predictor.from_checkpoint(**options)
    except CheckpointError as error:
        if args.workers > 1:
            predictor.close()
        print(f"error: {error}", file=sys.stderr)
        return 2

    source = "<stdin>" if args.input == "-" else args.input
    in_stream = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    out_stream = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    replaced_lines, rejected, written = [], [], 0
    progress = tqdm(desc="predict", unit="line", disable=args.output == "-", mininterval=2)
    chunk_lines = CHUNK_LINES * args.workers  # each worker gets about CHUNK_LINES lines of every chunk
    try:
        chunk = []  # (line number, text or None, error or None), in input order

        def flush():
            nonlocal written
            results = iter(predictor.predict([text for _, text, error in chunk if error is None]))
            for number, _, error in chunk:
                # A rejected line keeps its place in the output, so output line N answers input line N.
                result = {"line": number, "error": error} if error else next(results)
                out_stream.write(json.dumps(result, ensure_ascii=False) + "\n")
            written += len(chunk)
            progress.update(len(chunk))
            chunk.clear()

        for number, text, bad_bytes, error in read_texts(in_stream, input_format, source):
            if bad_bytes:
                replaced_lines.append(number)
            if error:
                rejected.append(error)
            chunk.append((number, text, error))
            if len(chunk) >= chunk_lines:
                flush()
        flush()
    finally:
        progress.close()
        if args.workers > 1:
            predictor.close()
        if out_stream is not sys.stdout:
            out_stream.close()
        if in_stream is not sys.stdin.buffer:
            in_stream.close()
    if replaced_lines:
        print(f"warning: {len(replaced_lines)} line(s) held bytes that are not UTF-8, replaced with U+FFFD: "
              f"lines {replaced_lines[:20]}{' ...' if len(replaced_lines) > 20 else ''}", file=sys.stderr)
    for error in rejected[:20]:
        print(f"warning: {error}; its output line holds the error instead of a prediction", file=sys.stderr)
    if len(rejected) > 20:
        print(f"warning: ... and {len(rejected) - 20} more rejected line(s)", file=sys.stderr)
    print(f"wrote {written} line(s) -> {args.output} ({written - len(rejected)} predicted, {len(rejected)} rejected)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
