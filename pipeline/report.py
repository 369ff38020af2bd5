"""Short human-readable reports of a finished run, for the end of scripts/main_job.sh.

    python -m pipeline.report metrics outputs/msra_quick/test_metrics.json
    python -m pipeline.report entities outputs/msra_quick/demo_predictions.jsonl

``metrics`` prints, for each scoring (conlleval-style, then strict IOB2), the test precision, recall and F1
(rounded to 4 digits) and the F1 per entity type;
``entities`` prints each predicted text followed by its entities as ``text/TYPE``. Reading JSON only,
so it runs in a second without Paddle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .files import read_json_object
from .metrics import KEY_PREFIXES, SCORING_NAMES, SCORINGS, upgrade_summary


def metrics_lines(metrics: dict, split: str = "test") -> list[str]:
    """One line per scoring the file holds: its name, ``{"precision": .., "recall": .., "f1": ..}`` then
    ``{TYPE: f1}``, rounded to 4 digits (files written before the conlleval-style scores hold strict only)."""
    scores = upgrade_summary(metrics[split])
    lines = []
    for scoring in SCORINGS:
        prefix = KEY_PREFIXES[scoring]
        if prefix + "f1" not in scores:
            continue
        overall = json.dumps({key: round(scores[prefix + key], 4) for key in ("precision", "recall", "f1")})
        per_type = {entity_type: round(values[prefix + "f1"], 4) for entity_type, values in scores["per_type"].items()}
        lines.append(f"{SCORING_NAMES[scoring] + ':':17}{overall} {per_type}")
    return lines


def entity_lines(result: dict) -> list[str]:
    """A prediction's text, then ``  -> text/TYPE, ...`` (or ``(no entities)``)."""
    found = ", ".join(f"{entity['text']}/{entity['type']}" for entity in result["entities"])
    return [result["text"], f"  -> {found or '(no entities)'}"]


def main(argv=None) -> int:
    """Print one report of a finished run; reading JSON only, it needs no Paddle."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("metrics", help="test P/R/F1 and F1 per type of a test_metrics.json").add_argument("file")
    commands.add_parser("entities", help="texts and their entities from predict.py's JSONL output").add_argument("file")
    args = parser.parse_args(argv)
    path = Path(args.file)
    if args.command == "metrics":
        print("\n".join(metrics_lines(read_json_object(path))))
    else:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                print("\n".join(entity_lines(json.loads(line))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
