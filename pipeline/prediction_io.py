"""Prediction files: the lines ``predict.py`` reads and the JSON lines it writes, in the same order.

Input is plain text (one text per line) or JSONL with a string ``"text"``
field, from a file or standard input (``-``). Every input line gives exactly one
output line, so output line N answers input line N: bytes that are not UTF-8 are
replaced with U+FFFD (the line is still predicted), and a JSONL line that cannot
be used gives ``{"line", "error"}`` in its place. Lines are read, predicted and
written a chunk at a time, so memory stays flat for any input size.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

INPUT_FORMATS = ("auto", "text", "jsonl")
CHUNK_LINES = 512  # lines read, predicted and written at a time: memory stays flat for any input size
STDIO = "-"
REPORTED_LINES = 20  # how many replaced or rejected lines the messages name


def resolve_input_format(input_format: str, path: str) -> str:
    """``"auto"`` is JSONL for a ``.jsonl`` path and text otherwise; other formats stay as given."""
    if input_format == "auto":
        return "jsonl" if path.endswith(".jsonl") else "text"
    return input_format


def output_problem(input_path: str, output_path: str, flag: str = "--output") -> str | None:
    """Why ``output_path`` cannot be written for ``input_path``, or None; checked before the model loads.

    Opening the output for writing truncates it, so an output that is the input (by name, link or
    hard link) would destroy the user's data before a line of it was read.
    """
    if output_path == STDIO:
        return None
    output = Path(output_path)
    if output.is_dir():
        return f"{flag} {output_path} is a directory; give a file path"
    if not output.parent.is_dir():
        return f"{flag} {output_path}: the directory {output.parent} does not exist"
    if input_path != STDIO and output.exists() and Path(input_path).exists() and os.path.samefile(input_path, output):
        return f"{flag} {output_path} is the input file {input_path}: writing it would destroy the input"
    return None


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


@dataclass
class PredictionReport:
    """What ``predict_file`` did: lines written, lines whose bytes were replaced, lines rejected."""

    output: str
    written: int = 0
    replaced_lines: list[int] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def messages(self) -> list[str]:
        """The lines for standard error: warnings first, then what was written where."""
        messages = []
        if self.replaced_lines:
            more = " ..." if len(self.replaced_lines) > REPORTED_LINES else ""
            messages.append(f"warning: {len(self.replaced_lines)} line(s) held bytes that are not UTF-8, replaced "
                            f"with U+FFFD: lines {self.replaced_lines[:REPORTED_LINES]}{more}")
        for error in self.rejected[:REPORTED_LINES]:
            messages.append(f"warning: {error}; its output line holds the error instead of a prediction")
        if len(self.rejected) > REPORTED_LINES:
            messages.append(f"warning: ... and {len(self.rejected) - REPORTED_LINES} more rejected line(s)")
        messages.append(f"wrote {self.written} line(s) -> {self.output} "
                        f"({self.written - len(self.rejected)} predicted, {len(self.rejected)} rejected)")
        return messages


def predict_file(predictor, input_path: str, output_path: str, input_format: str = "auto",
                 chunk_lines: int = CHUNK_LINES, progress: Callable[[int], object] | None = None) -> PredictionReport:
    """Predict every line of ``input_path`` (``-``: standard input) into ``output_path`` (``-``: standard output).

    ``predictor`` is anything with ``predict(texts) -> results`` (``Predictor``,
    ``ParallelPredictor``); ``progress`` is called with the number of lines of each chunk written.
    """
    input_format = resolve_input_format(input_format, input_path)
    source = "<stdin>" if input_path == STDIO else input_path
    report = PredictionReport(output_path)
    in_stream = sys.stdin.buffer if input_path == STDIO else open(input_path, "rb")
    try:
        out_stream = sys.stdout if output_path == STDIO else open(output_path, "w", encoding="utf-8")
        try:
            chunk = []  # (line number, text or None, error or None), in input order
            for number, text, bad_bytes, error in read_texts(in_stream, input_format, source):
                if bad_bytes:
                    report.replaced_lines.append(number)
                if error:
                    report.rejected.append(error)
                chunk.append((number, text, error))
                if len(chunk) >= chunk_lines:
                    _write_chunk(predictor, chunk, out_stream, report, progress)
            _write_chunk(predictor, chunk, out_stream, report, progress)
        finally:
            if out_stream is not sys.stdout:
                out_stream.close()
    finally:
        if in_stream is not sys.stdin.buffer:
            in_stream.close()
    return report


def _write_chunk(predictor, chunk: list, out_stream, report: PredictionReport, progress) -> None:
    """Predict a chunk's usable lines in one call and write one output line per input line; empty the chunk."""
    results = iter(predictor.predict([text for _, text, error in chunk if error is None]))
    for number, _, error in chunk:
        # A rejected line keeps its place in the output, so output line N answers input line N.
        result = {"line": number, "error": error} if error else next(results)
        out_stream.write(json.dumps(result, ensure_ascii=False) + "\n")
    report.written += len(chunk)
    if progress is not None:
        progress(len(chunk))
    chunk.clear()
