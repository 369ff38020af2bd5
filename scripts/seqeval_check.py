"""Recompute entity P/R/F1 with seqeval from saved predictions, beside the figures we reported: seqeval's
default mode against our conlleval-style scores, its strict IOB2 mode against our ``strict_`` ones.

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

    # Our key prefix for each seqeval mode: its default mode reads entities as conlleval does.
    modes = {"": ("seqeval default mode (conlleval-style)", {}),
             "strict_": ("seqeval strict IOB2", {"mode": "strict", "scheme": IOB2})}

    with open(args.predictions, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    gold, predicted = [r["gold"] for r in records], [r["predicted"] for r in records]
    ours = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prefix, (name, mode) in modes.items():
            scores = {"precision": precision_score(gold, predicted, **mode),
                      "recall": recall_score(gold, predicted, **mode), "f1": f1_score(gold, predicted, **mode)}
            ours[prefix] = name, scores
            print(f"{name}:\n{classification_report(gold, predicted, digits=4, **mode)}")
            print(f"{name} on {len(records)} sentences: " + ", ".join(f"{k} {v:.6f}" for k, v in scores.items()))
    if not args.reported:
        return 0
    with open(args.reported, encoding="utf-8") as handle:
        reported = json.loads(handle.read().strip().splitlines()[-1]) if args.reported.endswith(".jsonl") \
            else json.load(handle)
    reported = reported.get("test", reported)
    # Files written before both scorings existed hold only strict IOB2 figures, under the plain keys.
    if "strict_f1" not in reported:
        ours = {"": ours["strict_"]}
        print("(the reported file predates the conlleval-style scores: its figures are strict IOB2)")
    agree = True
    for prefix, (name, scores) in ours.items():
        same = all(math.isclose(reported[prefix + k], v, rel_tol=1e-9, abs_tol=1e-12) for k, v in scores.items())
        print(f"reported, against {name}: " + ", ".join(f"{k} {reported[prefix + k]:.6f}" for k in scores)
              + (": agree" if same else ": DISAGREE"))
        agree = agree and same
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
