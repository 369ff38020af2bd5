"""What a training run reports while it runs: the log lines, VisualDL scalars and the two JSONL histories.

Rank 0 writes everything; the throughput figures are first summed over ranks (a collective, so
every rank calls ``StepStats.reduce`` at the same step) so that they describe the whole job.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import paddle

from . import dist
from .metrics import SCORE_KEYS

# The training loop's lines keep one logger name, whichever module writes them.
logger = logging.getLogger("pipeline.trainer")

DEV_HISTORY_FILE = "dev_metrics.jsonl"
TRAIN_HISTORY_FILE = "train_metrics.jsonl"
VISUALDL_DIR = "vdl"


class StepStats:
    """Loss, token counts and gradient norms since the last log line, kept on the device until read."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.loss, self.real_tokens, self.batches, self.computed, self.grad_norms = None, None, 0, 0, []
        self.loss_scale_overflows = 0
        self.started, self.excluded = time.perf_counter(), 0.0

    def exclude(self, seconds: float):
        """Leave time spent outside training steps (evaluation) out of the next throughput figure."""
        self.excluded += seconds

    def add_grad_norm(self, norm):
        """Norm before clipping of a step that was taken (skipped NaN/Inf steps are logged apart), a device
        tensor read only by ``reduce``."""
        self.grad_norms.append(norm)

    def add_loss_scale_overflow(self):
        """A step the fp16 loss scaler skipped (alike on every rank: the gradients are all-reduced)."""
        self.loss_scale_overflows += 1

    def add(self, loss, real_tokens, computed_tokens: int):
        """One micro-batch: its loss and real (non-padding) token count as device tensors, its padded size."""
        self.loss = loss if self.loss is None else self.loss + loss
        self.real_tokens = real_tokens if self.real_tokens is None else self.real_tokens + real_tokens
        self.batches += 1
        self.computed += int(computed_tokens)

    def reduce(self) -> dict:
        """Read, reset and sum over ranks (collective): mean loss, real tokens/s, padding share, grad norm.

        One host-device sync per log line, not per step. The gradient norm needs no reduction: it is
        measured on all-reduced gradients, alike on every rank.
        """
        loss_sum = float(self.loss) if self.loss is not None else 0.0
        real = int(self.real_tokens) if self.real_tokens is not None else 0
        seconds = time.perf_counter() - self.started - self.excluded
        grad_norm = float(paddle.add_n(self.grad_norms)) / len(self.grad_norms) if self.grad_norms else None
        totals = dist.all_reduce_sum(np.array([loss_sum, self.batches, real, self.computed], dtype=np.float64))
        seconds = float(dist.all_reduce_max(np.array([seconds], dtype=np.float64))[0])
        overflows = self.loss_scale_overflows
        self._reset()
        return {"loss": totals[0] / max(totals[1], 1), "tokens_per_second": totals[2] / max(seconds, 1e-9),
                "padding": 1 - totals[2] / max(totals[3], 1), "grad_norm": grad_norm,
                "loss_scale_overflows": overflows}


class RunLog:
    """Rank 0's record of a run under ``checkpoint_dir``: histories, VisualDL scalars and log lines.

    On other ranks every method does nothing, so callers need no rank checks.
    """

    def __init__(self, output_dir, is_main: bool, use_vdl: bool):
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.writer = None
        if is_main and use_vdl:
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=str(self.output_dir / VISUALDL_DIR))

    def scalars(self, values: dict, step: int):
        """VisualDL scalars (``train/loss``, ``eval/f1``...) at ``step``."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(tag=key, value=float(value), step=step)

    def _append(self, name: str, record: dict):
        with open(self.output_dir / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def training(self, step: int, learning_rate: float, figures: dict):
        """One training log line, its scalars and its ``train_metrics.jsonl`` record."""
        if not self.is_main:
            return
        grad_norm = figures["grad_norm"]
        norm_text = f", grad norm {grad_norm:.3f}" if grad_norm is not None else ""
        overflows = figures["loss_scale_overflows"]
        if overflows:
            norm_text += f", {overflows} step(s) skipped by the fp16 loss scaler (overflow, scale lowered)"
        logger.info("step %d: loss %.4f, lr %.3e, %.0f real tokens/s, padding %.1f%%%s", step, figures["loss"],
                    learning_rate, figures["tokens_per_second"], 100 * figures["padding"], norm_text)
        scalars = {"train/loss": figures["loss"], "train/lr": learning_rate,
                   "train/tokens_per_second": figures["tokens_per_second"], "train/padding": figures["padding"]}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        self.scalars(scalars, step)
        # The same figures as a plain file, for plots and reports without VisualDL.
        self._append(TRAIN_HISTORY_FILE, {"step": step, "loss": figures["loss"], "lr": learning_rate,
                                          "tokens_per_second": figures["tokens_per_second"],
                                          "padding": figures["padding"], "grad_norm": grad_norm,
                                          "loss_scale_overflows": overflows})

    def evaluation(self, record: dict):
        """One dev evaluation: log line, ``eval/*`` scalars and its ``dev_metrics.jsonl`` record."""
        if not self.is_main:
            return
        logger.info("step %d dev: precision %.4f recall %.4f f1 %.4f (strict IOB2 f1 %.4f)", record["step"],
                    record["precision"], record["recall"], record["f1"], record["strict_f1"])
        self.scalars({f"eval/{k}": record[k] for k in SCORE_KEYS}, record["step"])
        self._append(DEV_HISTORY_FILE, record)

    def truncate(self, history: list, step: int):
        """After a resume, drop what the interrupted run logged past the state it resumes from."""
        if not self.is_main:
            return
        lines = [json.dumps(record) + "\n" for record in history]
        (self.output_dir / DEV_HISTORY_FILE).write_text("".join(lines), encoding="utf-8")
        train_log = self.output_dir / TRAIN_HISTORY_FILE
        if not train_log.is_file():
            return
        kept, unreadable = [], []
        for number, line in enumerate(train_log.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                # A line cut short when the interrupted run died mid-append (disk full, kill): it holds
                # nothing a resumed run needs, and it must not stop the resume.
                unreadable.append(number)
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line + "\n")
        if unreadable:
            logger.warning("%s: dropped unreadable line(s) %s left by the interrupted run", train_log, unreadable)
        train_log.write_text("".join(kept), encoding="utf-8")

    def close(self):
        """Flush and close VisualDL's writer."""
        if self.writer is not None:
            self.writer.close()
