"""Plot a run's curves: dev P/R/F1 and training loss against optimiser steps.

    .venv/bin/python scripts/plot_run.py outputs/msra_full --output docs/msra_full_curves.png

Reads ``dev_metrics.jsonl`` and ``train_metrics.jsonl`` (written by rank 0 during training).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; is this a checkpoint_dir written by train_dist.py?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="checkpoint_dir of a run")
    parser.add_argument("--output", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    dev = read_jsonl(args.run_dir / "dev_metrics.jsonl")
    train = read_jsonl(args.run_dir / "train_metrics.jsonl")

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    steps = [r["step"] for r in dev]
    # Runs logged before both scorings existed hold strict IOB2 figures under the plain keys.
    scoring = "conlleval-style" if "strict_f1" in dev[0] else "strict IOB2"
    for key, style in (("f1", "o-"), ("precision", "--"), ("recall", ":")):
        top.plot(steps, [r[key] for r in dev], style, label=f"dev {key} ({scoring})")
    if "strict_f1" in dev[0]:
        top.plot(steps, [r["strict_f1"] for r in dev], "s-", markersize=3, alpha=0.6, label="dev f1 (strict IOB2)")
    best = max(dev, key=lambda r: r["f1"])
    top.annotate(f"best dev F1 {best['f1']:.4f} (step {best['step']})", (best["step"], best["f1"]),
                 textcoords="offset points", xytext=(-150, -30), arrowprops={"arrowstyle": "->"})
    top.set_ylabel("entity-level score")
    top.grid(alpha=0.3)
    top.legend(loc="lower right")
    bottom.plot([r["step"] for r in train], [r["loss"] for r in train], linewidth=0.8, label="training loss")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimiser step")
    # Two lines: on one, the label is taller than its panel and runs into the upper panel's label.
    bottom.set_ylabel("training loss, log scale\n(cross-entropy, or the CRF's negative log-likelihood)")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right")
    figure.suptitle(args.title or str(args.run_dir))
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
