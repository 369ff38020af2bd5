"""Recompute entity P/R/F1 with seqeval from saved predictions, beside the figures we reported.

    .venv/bin/python scripts/seqeval_check.py outputs/msra_full/test_predictions.jsonl \\
        --reported outputs/msra_full/test_metrics.json

The predictions file is what training (``test_predictions.jsonl``) or
``python -m pipeline.evaluate --predictions`` writes: one JSON line per sentence
with ``gold`` and ``predicted`` label lists. Exit status 1 if seqeval disagrees.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions")
    parser.add_argument("--reported", help="test_metrics.json (its 'test' entry) or an evaluate JSON line")
    args = parser.parse_args(argv)
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    with open(args.predictions, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    gold, predicted = [r["gold"] for r in records], [r["predicted"] for r in records]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = {"precision": precision_score(gold, predicted, mode="strict", scheme=IOB2),
                "recall": recall_score(gold, predicted, mode="strict", scheme=IOB2),
                "f1": f1_score(gold, predicted, mode="strict", scheme=IOB2)}
        print(classification_report(gold, predicted, mode="strict", scheme=IOB2, digits=4))
    print(f"seqeval (strict IOB2) on {len(records)} sentences: " +
          ", ".join(f"{k} {v:.6f}" for k, v in ours.items()))
    if not args.reported:
        return 0
    with open(args.reported, encoding="utf-8") as handle:
        reported = json.loads(handle.read().strip().splitlines()[-1]) if args.reported.endswith(".jsonl") \
            else json.load(handle)
    reported = reported.get("test", reported)
    agree = all(math.isclose(reported[k], ours[k], rel_tol=1e-9, abs_tol=1e-12) for k in ours)
    print("reported:                          " + ", ".join(f"{k} {reported[k]:.6f}" for k in ours))
    print("agree" if agree else "DISAGREE")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
