"""Prediction files: the lines ``predict.py`` reads and the JSON lines it writes, in the same order.

Input is plain text (one text per line) or JSONL with a string ``"text"``
field, from a file or standard input (``-``). Every input line gives exactly one
output line, so output line N answers input line N: bytes that are not UTF-8 are
replaced with U+FFFD (the line is still predicted), and a JSONL line that cannot
be used gives ``{"line", "error"}`` in its place. Lines are read, predicted and
written a chunk at a time, so memory stays flat for any input size.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .files import ResumableLineFile, ResumeRefused

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


def read_texts(lines, input_format: str, source: str, first_number: int = 1):
    """Yield ``(line_number, text, had_bad_bytes, error)`` for every input line, in order.

    ``error`` is a message naming the line when it cannot be used (``text`` is then None).
    ``first_number``: the number of the first of ``lines`` (a resumed run starts mid-file).
    """
    for number, raw in enumerate(lines, start=first_number):
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




def count_lines(path: str) -> int:
    """How many lines ``predict_file`` will read from ``path``: newlines, plus a last line without one."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


FINGERPRINT_BYTES = 1 << 16  # hashed at each end of the input: cheap for any size, and an edit there shows


def input_fingerprint(path: str) -> dict:
    """What identifies the input of an unfinished output: size, modification time, hashes of both ends."""
    if path == STDIO:
        return {"stdin": True}
    status = os.stat(path)
    with open(path, "rb") as handle:
        head = handle.read(FINGERPRINT_BYTES)
        handle.seek(max(0, status.st_size - FINGERPRINT_BYTES))
        tail = handle.read(FINGERPRINT_BYTES)
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "head_sha256": hashlib.sha256(head).hexdigest(), "tail_sha256": hashlib.sha256(tail).hexdigest()}


def checkpoint_fingerprint(directory) -> dict:
    """Size and modification time of every file of a checkpoint directory: a retrained or edited one differs."""
    return {entry.name: [entry.stat().st_size, entry.stat().st_mtime_ns]
            for entry in sorted(Path(directory).iterdir()) if entry.is_file()}


def prediction_identity(input_path: str, checkpoint, settings: dict) -> dict:
    """What an output's lines are made from; an unfinished output is continued only with the same identity."""
    return {"input": input_fingerprint(input_path), "checkpoint": checkpoint_fingerprint(checkpoint),
            "settings": settings}


@dataclass
class PredictionReport:
    """What the output holds so far (over every run that wrote it) and what this run did.

    The counts are saved with each commit of a resumable output, so a continued run reports the
    whole file; only the first ``REPORTED_LINES`` replaced and rejected lines are kept by name.
    """

    output: str
    written: int = 0
    rejected: int = 0
    entities: int = 0
    replaced: int = 0
    replaced_lines: list[int] = field(default_factory=list)
    rejected_errors: list[str] = field(default_factory=list)
    resumed_after: int = 0  # lines an earlier run had written
    predicted_now: int = 0  # lines this run predicted (for its speed)
    seconds: float = 0.0  # this run's time reading, predicting and writing

    SAVED = ("written", "rejected", "entities", "replaced", "replaced_lines", "rejected_errors")

    def state(self) -> dict:
        """The counts a resumed run continues from."""
        return {name: getattr(self, name) for name in self.SAVED}

    @classmethod
    def continued(cls, output: str, state: dict) -> "PredictionReport":
        report = cls(output, **{name: state[name] for name in cls.SAVED if name in state})
        report.resumed_after = report.written
        return report

    def add_replaced(self, number: int) -> None:
        self.replaced += 1
        if len(self.replaced_lines) < REPORTED_LINES:
            self.replaced_lines.append(number)

    def add_rejected(self, error: str) -> None:
        self.rejected += 1
        if len(self.rejected_errors) < REPORTED_LINES:
            self.rejected_errors.append(error)

    @property
    def sentences_per_second(self) -> float:
        return self.predicted_now / self.seconds if self.seconds > 0 else 0.0

    def messages(self) -> list[str]:
        """The lines for standard error: warnings first, then the summary of what was written where."""
        messages = []
        if self.replaced:
            more = " ..." if self.replaced > len(self.replaced_lines) else ""
            messages.append(f"warning: {self.replaced} line(s) held bytes that are not UTF-8, replaced "
                            f"with U+FFFD: lines {self.replaced_lines}{more}")
        for error in self.rejected_errors:
            messages.append(f"warning: {error}; its output line holds the error instead of a prediction")
        if self.rejected > len(self.rejected_errors):
            messages.append(f"warning: ... and {self.rejected - len(self.rejected_errors)} more rejected line(s)")
        messages.append(self.summary())
        return messages

    def summary(self) -> str:
        """One line: lines, predicted, rejected, entities, then this run's speed."""
        resumed = f", continued after line {self.resumed_after}" if self.resumed_after else ""
        return (f"wrote {self.written} line(s) -> {self.output} ({self.written - self.rejected} predicted, "
                f"{self.rejected} rejected, {self.entities} entities); this run: {self.predicted_now} "
                f"sentence(s) in {self.seconds:.1f} s, {self.sentences_per_second:.1f} sentences/s{resumed}")


@dataclass
class PredictionRun:
    """One prediction's input and output, checked before the model loads (``start_prediction``)."""

    input_path: str
    input_format: str  # resolved: text or jsonl
    output_path: str
    output: ResumableLineFile | None  # None for standard output, written as it comes
    overwrite: bool = False
    done: int = 0  # lines an earlier, unfinished run left to continue from

    def initial_state(self) -> dict:
        return {"input_offset": 0, "report": PredictionReport(self.output_path).state()}


def start_prediction(input_path: str, output_path: str, input_format: str = "auto", identity: dict | None = None,
                     overwrite: bool = False) -> PredictionRun:
    """Where a prediction reads and writes, and how far an unfinished earlier one got; writes nothing.

    A file output is written as ``OUTPUT.partial`` and renamed to ``OUTPUT`` when complete
    (``ResumableLineFile``); an unfinished one of the same ``identity`` (``prediction_identity``) is
    continued after its last complete line. ResumeRefused when it was made from another input,
    checkpoint or settings, or from standard input, which cannot be read again; ``overwrite`` starts anew.
    """
    run = PredictionRun(input_path, resolve_input_format(input_format, input_path), output_path, None, overwrite)
    if output_path == STDIO:
        return run
    run.output = ResumableLineFile(output_path, identity or {})
    run.done = run.output.unfinished(overwrite) or 0
    if run.done and input_path == STDIO:
        raise ResumeRefused(f"{run.output.partial} holds {run.done} line(s) of an unfinished prediction from "
                            f"standard input, which cannot be continued")
    return run


class PredictionStopped(Exception):
    """A stop was asked for (``should_stop``) and the run ended after committing a whole chunk."""

    def __init__(self, lines_done: int):
        super().__init__(f"stopped after line {lines_done}")
        self.lines_done = lines_done


def predict_file(predictor, run: PredictionRun, chunk_lines: int = CHUNK_LINES,
                 progress: Callable[[int], object] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> PredictionReport:
    """Predict every line of ``run``'s input, after those an earlier run finished, into its output.

    ``predictor`` is anything with ``predict(texts) -> results`` (``Predictor``, ``ParallelPredictor``,
    ``RankPredictor``); ``progress`` is called with the number of lines of each chunk written. Each
    chunk of ``chunk_lines`` lines is committed as a whole: an interrupted run leaves the lines of its
    last commit in ``OUTPUT.partial``, which the same command continues. ``should_stop`` is asked after
    each committed chunk; True ends the run there with ``PredictionStopped`` (a graceful stop: nothing of
    the chunk in flight is lost or redone).
    """
    started = time.perf_counter()
    source = "<stdin>" if run.input_path == STDIO else run.input_path
    state = run.initial_state() if run.output is None else run.output.open(run.initial_state(), run.overwrite)
    report = PredictionReport.continued(run.output_path, state["report"])
    in_stream = sys.stdin.buffer if run.input_path == STDIO else open(run.input_path, "rb")
    try:
        if state["input_offset"]:
            in_stream.seek(state["input_offset"])  # the bytes of the lines already done, found again by seek
        lines = _CountedLines(in_stream, state["input_offset"])
        chunk = []  # (line number, text or None, error or None), in input order
        for number, text, bad_bytes, error in read_texts(lines, run.input_format, source, report.written + 1):
            if bad_bytes:
                report.add_replaced(number)
            if error:
                report.add_rejected(error)
            chunk.append((number, text, error))
            if len(chunk) >= chunk_lines:
                # lines.offset is the end of the chunk's last line: read_texts asks for a line only when it yields.
                _write_chunk(predictor, chunk, run, report, lines.offset, progress)
                if should_stop is not None and should_stop():
                    raise PredictionStopped(report.written)
        _write_chunk(predictor, chunk, run, report, lines.offset, progress)
        if run.output is not None:
            run.output.finish()
    finally:
        if run.output is not None:
            run.output.close()  # without finish() (an exception): the partial file stays, to be continued
        if in_stream is not sys.stdin.buffer:
            in_stream.close()
        report.seconds = time.perf_counter() - started
    return report


class _CountedLines:
    """The lines of a binary stream, counting the bytes handed out so far (``offset``)."""

    def __init__(self, stream, offset: int):
        self.stream, self.offset = stream, offset

    def __iter__(self):
        for raw in self.stream:
            self.offset += len(raw)
            yield raw


def _write_chunk(predictor, chunk: list, run: PredictionRun, report: PredictionReport, input_offset: int,
                 progress) -> None:
    """Predict a chunk's usable lines in one call, write one output line per input line, commit; empty the chunk."""
    if not chunk:
        return
    results = iter(predictor.predict([text for _, text, error in chunk if error is None]))
    lines = []
    for number, _, error in chunk:
        # A rejected line keeps its place in the output, so output line N answers input line N.
        result = {"line": number, "error": error} if error else next(results)
        if not error:
            report.entities += len(result["entities"])
            report.predicted_now += 1
        lines.append(json.dumps(result, ensure_ascii=False) + "\n")
    report.written += len(chunk)
    if run.output is None:
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
    else:
        run.output.commit(lines, {"input_offset": input_offset, "report": report.state()})
    if progress is not None:
        progress(len(chunk))
    chunk.clear()
