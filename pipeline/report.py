"""Short human-readable reports of a finished run, for the end of scripts/main_job.sh.

    python -m pipeline.report metrics outputs/msra_quick/test_metrics.json
    python -m pipeline.report entities outputs/msra_quick/demo_predictions.jsonl
    python -m pipeline.report gold outputs/msra_quick/demo_predictions.jsonl examples/paddlehub_demo_gold.tsv

``metrics`` prints, for each scoring (conlleval-style, then strict IOB2), the test precision, recall and F1
(rounded to 4 digits) and the F1 per entity type;
``entities`` prints each predicted text followed by its entities as ``text/TYPE``; ``gold`` sets those
entities against a labelled file of the same texts (the demo's: MSRA-NER's own annotation of its four
sentences) and prints what was missed or found beyond it. Reading JSON and TSV only, so it runs in a
second without Paddle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .files import read_json_object
from .metrics import KEY_PREFIXES, SCORING_NAMES, SCORINGS, upgrade_summary
from .readers import read_examples
from .text import entities_of


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


def entity_name(entity: dict) -> str:
    """``text/TYPE`` of an entity as ``pipeline.text.entities_of`` (and so predict.py) writes it."""
    return f"{entity['text']}/{entity['type']}"


def entity_lines(result: dict) -> list[str]:
    """A prediction's text, then ``  -> text/TYPE, ...`` (or ``(no entities)``)."""
    found = ", ".join(entity_name(entity) for entity in result["entities"])
    return [result["text"], f"  -> {found or '(no entities)'}"]


def read_predictions(path: Path) -> list[dict]:
    """predict.py's JSONL output; ValueError naming the file and line of one that is not a prediction (cut off, or
    the ``{"line", "error"}`` predict.py writes for an input line it rejected)."""
    results = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a line of predict.py's JSONL output ({error.msg})") from None
            if not isinstance(result, dict) or not {"text", "labels", "entities"} <= result.keys():
                raise ValueError(f"{path}:{number}: not a prediction (predict.py writes text, labels and entities; "
                                 f"this line has {sorted(result) if isinstance(result, dict) else type(result).__name__})")
            results.append(result)
    return results


def gold_lines(results: list[dict], gold_file) -> list[str]:
    """Predicted entities against a labelled file of the same texts, in order: per text what was missed and
    what is spurious (a wrong type or boundary counts as both), then the totals.

    Raises ValueError when the texts differ from the labelled file's: a comparison of other sentences
    would mean nothing.
    """
    examples, _ = read_examples(gold_file)
    if len(examples) != len(results):
        raise ValueError(f"{gold_file} holds {len(examples)} sentences, the predictions {len(results)}")
    lines, found, missed, spurious = [], 0, 0, 0
    for number, (example, result) in enumerate(zip(examples, results), start=1):
        if "".join(example.tokens) != result["text"]:
            raise ValueError(f"text {number} differs: {gold_file} has {''.join(example.tokens)!r}, "
                             f"the predictions {result['text']!r}")
        # Entities compared with their positions: a name that occurs twice is two entities.
        gold, predicted = entities_of(result["text"], example.labels), result["entities"]
        missing = [entity_name(entity) for entity in gold if entity not in predicted]
        extra = [entity_name(entity) for entity in predicted if entity not in gold]
        found += len(gold) - len(missing)
        missed += len(missing)
        spurious += len(extra)
        verdict = "all right" if not missing and not extra else (
            f"missed {', '.join(missing) or 'nothing'}; spurious {', '.join(extra) or 'nothing'}")
        lines.append(f"{number}: {len(gold) - len(missing)}/{len(gold)} gold entities; {verdict}")
    lines.append(f"in all: {found} of {found + missed} gold entities found, {spurious} spurious")
    return lines


def main(argv=None) -> int:
    """Print one report of a finished run; reading JSON only, it needs no Paddle."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("metrics", help="test P/R/F1 and F1 per type of a test_metrics.json").add_argument("file")
    commands.add_parser("entities", help="texts and their entities from predict.py's JSONL output").add_argument("file")
    gold = commands.add_parser("gold", help="predict.py's entities against a labelled file of the same texts")
    gold.add_argument("file", help="predict.py's JSONL output")
    gold.add_argument("gold_file", help="the same texts with their gold labels (.tsv, .conll/.txt or .jsonl)")
    args = parser.parse_args(argv)
    path = Path(args.file)
    if args.command == "metrics":
        print("\n".join(metrics_lines(read_json_object(path))))
    elif args.command == "gold":
        try:
            print("\n".join(gold_lines(read_predictions(path), args.gold_file)))
        except (ValueError, OSError) as error:  # the readers' DataError is a ValueError naming file and line
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                print("\n".join(entity_lines(json.loads(line))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
