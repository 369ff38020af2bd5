"""Entity errors by kind, from gold and predicted tag sequences: what ``pipeline.evaluate --report`` writes.

Within a sentence, gold entities never overlap one another, nor do predicted ones (a BIO sequence gives
each token at most one entity), so every predicted and every gold entity gets exactly one outcome:

- ``correct``: the other side has an entity of the same type and span;
- ``wrong_type``: the other side has an entity of the same span (start and end) but another type;
- ``wrong_boundary``: not the above, and an entity of the same type overlaps it with another span;
- ``wrong_type_and_boundary``: not the above, and only entities of other types overlap it;
- ``spurious`` (a prediction) or ``missed`` (a gold entity): nothing on the other side overlaps it.

So the predicted outcomes add up to the number of predicted entities and the gold outcomes to the number
of gold entities. A correctly predicted entity overlaps nothing else (the tokens are its own on both
sides), so errors only pair entities that are both wrong. A mistake is one such pair, or a lone missed or
spurious entity; the most frequent mistakes are counted by their texts and types. Entities are read
conlleval-style by default (``pipeline.metrics.SPAN_READERS``), the scoring the headline F1 uses.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .files import write_json
from .metrics import KEY_PREFIXES, SCORINGS, SCORING_NAMES, SPAN_READERS, EntityCounts

# Outcomes in the order reports list them; the last one differs between the two sides.
ERROR_KINDS = ("wrong_type", "wrong_boundary", "wrong_type_and_boundary")
PREDICTED_OUTCOMES = ("correct", *ERROR_KINDS, "spurious")
GOLD_OUTCOMES = ("correct", *ERROR_KINDS, "missed")
REPORT_JSON, REPORT_MARKDOWN, REPORT_PLOT = "error_analysis.json", "error_analysis.md", "errors_by_type.png"

Span = tuple[str, int, int]  # (type, start, end), end exclusive


def _overlaps(a: Span, b: Span) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def _pair_kind(gold: Span, predicted: Span) -> str:
    """The kind of error an overlapping gold and predicted entity (not both the same) make together."""
    if gold[1:] == predicted[1:]:
        return "wrong_type"
    return "wrong_boundary" if gold[0] == predicted[0] else "wrong_type_and_boundary"


def _outcome(pair_kinds: set[str], alone: str) -> str:
    """One entity's outcome from the kinds of the pairs it is in: the first in ``ERROR_KINDS`` order."""
    return next((kind for kind in ERROR_KINDS if kind in pair_kinds), alone)


def classify(gold: Sequence[Span], predicted: Sequence[Span]):
    """One sentence's entities: ``(gold outcomes, predicted outcomes, mistakes)``.

    The outcomes are ``{span: outcome}``; a mistake is ``(kind, gold span or None, predicted span or None)``.
    """
    correct = set(gold) & set(predicted)
    gold_wrong = [span for span in gold if span not in correct]
    predicted_wrong = [span for span in predicted if span not in correct]
    pairs = [(_pair_kind(g, p), g, p) for g in gold_wrong for p in predicted_wrong if _overlaps(g, p)]
    gold_outcomes = {span: "correct" for span in correct}
    for span in gold_wrong:
        gold_outcomes[span] = _outcome({kind for kind, g, _ in pairs if g == span}, "missed")
    predicted_outcomes = {span: "correct" for span in correct}
    for span in predicted_wrong:
        predicted_outcomes[span] = _outcome({kind for kind, _, p in pairs if p == span}, "spurious")
    mistakes = pairs + [("missed", g, None) for g in gold_wrong if gold_outcomes[g] == "missed"]
    mistakes += [("spurious", None, p) for p in predicted_wrong if predicted_outcomes[p] == "spurious"]
    return gold_outcomes, predicted_outcomes, mistakes


class ErrorAnalysis:
    """Outcome counts per side and type, and mistakes by their texts with a first example, over sentences."""

    def __init__(self, entity_types: Sequence[str], scoring: str = "conlleval", separator: str = ""):
        """``separator`` joins tokens into text: "" for characters, " " for words."""
        self.entity_types, self.scoring, self.separator = list(entity_types), scoring, separator
        self.scores = EntityCounts(self.entity_types)
        self.outcomes = {
            "predicted": {t: dict.fromkeys(PREDICTED_OUTCOMES, 0) for t in self.entity_types},
            "gold": {t: dict.fromkeys(GOLD_OUTCOMES, 0) for t in self.entity_types},
        }
        self.mistakes: Counter = Counter()
        self.examples: dict = {}  # mistake -> (source, sentence, sentence with the mistake marked), first seen

    def update(self, tokens: list[str], gold_tags: list[str], predicted_tags: list[str], source: str = "") -> None:
        """Add one sentence (its labels are checked by ``EntityCounts.update``, which scores it)."""
        self.scores.update([gold_tags], [predicted_tags])
        read = SPAN_READERS[self.scoring]
        gold_outcomes, predicted_outcomes, mistakes = classify(read(gold_tags), read(predicted_tags))
        for side, outcomes in (("gold", gold_outcomes), ("predicted", predicted_outcomes)):
            for (entity_type, _, _), outcome in outcomes.items():
                self.outcomes[side][entity_type][outcome] += 1
        for kind, gold, predicted in mistakes:
            key = (kind, self._entity(tokens, gold), self._entity(tokens, predicted))
            self.mistakes[key] += 1
            if key not in self.examples:
                spans = [span for span in (gold, predicted) if span is not None]
                start, end = min(span[1] for span in spans), max(span[2] for span in spans)
                marked = tokens[:start] + ["【" + self.separator.join(tokens[start:end]) + "】"] + tokens[end:]
                self.examples[key] = (source, self.separator.join(tokens), self.separator.join(marked))

    def _entity(self, tokens: list[str], span: Span | None) -> str | None:
        """``text/TYPE`` of a span, or None."""
        return None if span is None else f"{self.separator.join(tokens[span[1]:span[2]])}/{span[0]}"

    def report(self, top: int = 20) -> dict:
        """Everything as JSON-ready data: scores (both scorings), outcomes by side and type, top mistakes."""
        totals = {side: {outcome: sum(counts[outcome] for counts in per_type.values()) for outcome in outcomes}
                  for (side, per_type), outcomes in zip(self.outcomes.items(), (PREDICTED_OUTCOMES, GOLD_OUTCOMES))}
        return {
            "entities_read": SCORING_NAMES[self.scoring],
            "scores": self.scores.summary(),
            "outcomes": {side: {"total": totals[side], "per_type": self.outcomes[side]} for side in self.outcomes},
            "top_mistakes": [
                {"kind": key[0], "gold": key[1], "predicted": key[2], "count": count,
                 **dict(zip(("source", "sentence", "marked"), self.examples[key]))}
                for key, count in self.mistakes.most_common(top)
            ],
        }


def analyse(examples, predictions: list[list[str]], entity_types: Sequence[str], separator: str = "",
            scoring: str = "conlleval") -> ErrorAnalysis:
    """The analysis of labelled examples (``tokens``, ``labels``, ``source``) against their predicted labels."""
    analysis = ErrorAnalysis(entity_types, scoring, separator)
    for example, predicted in zip(examples, predictions, strict=True):
        analysis.update(example.tokens, example.labels, predicted, example.source)
    return analysis


def markdown(report: dict, title: str) -> str:
    """The report as a readable page: scores per type in both scorings, outcomes, top mistakes."""
    scores = report["scores"]
    lines = [f"# Error analysis: {title}", ""]
    for scoring in SCORINGS:
        prefix = KEY_PREFIXES[scoring]
        lines += [f"## Scores, {SCORING_NAMES[scoring]}", "", "| type | precision | recall | F1 | support |",
                  "|---|---|---|---|---|",
                  f"| overall | {scores[prefix + 'precision']:.4f} | {scores[prefix + 'recall']:.4f} | "
                  f"{scores[prefix + 'f1']:.4f} | {scores[prefix + 'num_gold']} |"]
        lines += [f"| {t} | {v[prefix + 'precision']:.4f} | {v[prefix + 'recall']:.4f} | {v[prefix + 'f1']:.4f} | "
                  f"{v[prefix + 'support']} |" for t, v in scores["per_type"].items()]
        lines.append("")
    lines += [f"## Entities by outcome (entities read {report['entities_read']})", "",
              "Wrong type: same span, other type. Wrong boundary: overlapped by the other side's entity of the "
              "same type, other span. Wrong type and boundary: overlapped only by other types' entities. "
              "Missed / spurious: nothing on the other side overlaps it.", ""]
    for side, outcomes in (("predicted", PREDICTED_OUTCOMES), ("gold", GOLD_OUTCOMES)):
        block = report["outcomes"][side]
        lines += [f"| {side} | " + " | ".join(outcomes) + " | all |", "|---" * (len(outcomes) + 2) + "|"]
        for name, counts in [*block["per_type"].items(), ("all types", block["total"])]:
            lines.append(f"| {name} | " + " | ".join(str(counts[o]) for o in outcomes) + f" | {sum(counts.values())} |")
        lines.append("")
    lines += ["## Most frequent mistakes", "", "Each with the first sentence it occurs in, its tokens in 【】.", "",
              "| count | kind | gold | predicted | example (source) |", "|---|---|---|---|---|"]
    for mistake in report["top_mistakes"]:
        sentence = mistake["marked"].replace("|", "\\|")
        lines.append(f"| {mistake['count']} | {mistake['kind']} | {mistake['gold'] or '-'} | "
                     f"{mistake['predicted'] or '-'} | {sentence} ({mistake['source']}) |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path, title: str) -> None:
    """A PNG of the error outcomes per entity type, predicted and gold side by side (stacked bars)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, side, outcomes in ((axes[0], "predicted", PREDICTED_OUTCOMES[1:]), (axes[1], "gold", GOLD_OUTCOMES[1:])):
        per_type = report["outcomes"][side]["per_type"]
        types, bottom = list(per_type), [0] * len(per_type)
        for outcome in outcomes:
            heights = [per_type[t][outcome] for t in types]
            axis.bar(types, heights, bottom=bottom, label=outcome.replace("_", " "))
            bottom = [b + h for b, h in zip(bottom, heights)]
        axis.set_title(f"{side} entities that are wrong")
        axis.set_xlabel("entity type")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("entities")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(directory, analysis: ErrorAnalysis, title: str, top: int = 20) -> list[Path]:
    """Write the JSON, markdown and PNG reports into ``directory`` (created if needed); return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = analysis.report(top)
    paths = [directory / name for name in (REPORT_JSON, REPORT_MARKDOWN, REPORT_PLOT)]
    write_json(paths[0], report)
    paths[1].write_text(markdown(report, title), encoding="utf-8")
    plot(report, paths[2], title)
    return paths
