"""pipeline.report and `train_dist.py --get`: the commands scripts/main_job.sh runs around training."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT
from pipeline import report
from pipeline.metrics import EntityCounts
from pipeline.text import entities_of

TEST_METRICS = {"test": {
    "precision": 0.78134999, "recall": 0.775149, "f1": 0.7782, "num_predicted": 10,
    "per_type": {"PER": {"precision": 1.0, "recall": 0.5, "f1": 0.823449, "support": 3},
                 "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
                 "LOC": {"precision": 1, "recall": 1, "f1": 1, "support": 2}}}}
PREDICTIONS = [
    {"text": "新华社北京5月7日电", "labels": ["B-ORG", "I-ORG", "I-ORG", "B-LOC", "I-LOC", "O", "O", "O", "O", "O"],
     "entities": [{"type": "ORG", "start": 0, "end": 3, "text": "新华社"},
                  {"type": "LOC", "start": 3, "end": 5, "text": "北京"}]},
    {"text": "今天", "labels": ["O", "O"], "entities": []},
    {"text": "", "labels": [], "entities": []},
]


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_metrics_lines_are_each_scorings_rounded_overall_scores_then_f1_per_type(tmp_path, capsys):
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    predicted = [["I-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]  # PER correct conlleval-style only
    counts = EntityCounts(["PER", "ORG", "LOC"])
    counts.update(gold, predicted)
    expected = ['conlleval-style: {"precision": 0.6667, "recall": 0.6667, "f1": 0.6667} '
                "{'PER': 1.0, 'ORG': 0.0, 'LOC': 1.0}",
                'strict IOB2:     {"precision": 0.5, "recall": 0.3333, "f1": 0.4} '
                "{'PER': 0.0, 'ORG': 0.0, 'LOC': 1.0}"]
    assert report.metrics_lines({"test": counts.summary()}) == expected
    path = tmp_path / "test_metrics.json"
    path.write_text(json.dumps({"step": 3, "test": counts.summary()}), encoding="utf-8")
    assert report.main(["metrics", str(path)]) == 0
    assert capsys.readouterr().out == "\n".join(expected) + "\n"


def test_metrics_of_a_file_written_before_both_scorings_are_its_strict_figures():
    # The plain keys of an old test_metrics.json held strict IOB2 figures.
    assert report.metrics_lines(TEST_METRICS) == [
        'strict IOB2:     {"precision": 0.7813, "recall": 0.7751, "f1": 0.7782} '
        "{'PER': 0.8234, 'ORG': 0.0, 'LOC': 1}"]


def test_entities_lists_each_text_with_its_entities(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PREDICTIONS), encoding="utf-8")
    done = run("-m", "pipeline.report", "entities", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["新华社北京5月7日电", "  -> 新华社/ORG, 北京/LOC", "今天", "  -> (no entities)",
                                        "", "  -> (no entities)"]


def test_get_prints_one_resolved_config_value_without_training(tmp_path):
    config = "configs/msra_m3e_small_quick.yaml"
    assert run("train_dist.py", "--config", config, "--get", "checkpoint_dir").stdout == "outputs/msra_quick\n"
    done = run("train_dist.py", "--config", config, "--get", "checkpoint_dir", f"checkpoint_dir={tmp_path}", "epochs=2")
    assert done.returncode == 0 and done.stdout == f"{tmp_path}\n"
    assert not tmp_path.joinpath("run.lock").exists()  # nothing was claimed, nothing trained
    unknown = run("train_dist.py", "--config", config, "--get", "no_such_key")
    assert unknown.returncode == 2 and "no_such_key" in unknown.stderr and unknown.stdout == ""
    invalid = run("train_dist.py", "--config", config, "--get", "checkpoint_dir", "epochs=0")
    assert invalid.returncode == 2 and "epochs must be >= 1" in invalid.stderr and invalid.stdout == ""


def test_main_job_calls_commands_not_inline_programs():
    script = (ROOT / "scripts" / "main_job.sh").read_text(encoding="utf-8")
    assert " -c " not in script
    assert "--get checkpoint_dir" in script and "-m pipeline.report metrics" in script
    assert "-m pipeline.report entities" in script
    assert "-m pipeline.report gold \"$OUT/demo_predictions.jsonl\" examples/paddlehub_demo_gold.tsv" in script


def _gold_file(tmp_path, sentences):
    from pipeline.readers import write_tsv

    path = tmp_path / "gold.tsv"
    write_tsv(path, [(list(text), labels) for text, labels in sentences])
    return path


def _prediction(text, labels):
    """One line of predict.py's output."""
    return {"text": text, "labels": labels, "entities": entities_of(text, labels)}


def test_gold_lines_name_missed_and_spurious_entities_and_count_them(tmp_path):
    gold = _gold_file(tmp_path, [
        ("新华社北京5月7日电", ["B-ORG", "I-ORG", "I-ORG", "B-LOC", "I-LOC", "O", "O", "O", "O", "O"]),
        ("华裔作家", ["B-LOC", "O", "O", "O"]),
        ("今天", ["O", "O"]),
        ("大足到大足", ["B-LOC", "I-LOC", "O", "B-LOC", "I-LOC"]),
    ])
    results = [PREDICTIONS[0], _prediction("华裔作家", ["B-PER", "I-PER", "O", "O"]),  # wrong type and end
               PREDICTIONS[1], _prediction("大足到大足", ["B-LOC", "I-LOC", "O", "O", "O"])]  # the second missed
    assert report.gold_lines(results, gold) == [
        "1: 2/2 gold entities; all right",
        "2: 0/1 gold entities; missed 华/LOC; spurious 华裔/PER",
        "3: 0/0 gold entities; all right",
        "4: 1/2 gold entities; missed 大足/LOC; spurious nothing",
        "in all: 3 of 5 gold entities found, 1 spurious",
    ]


def test_gold_refuses_other_texts_or_another_count_in_one_line(tmp_path):
    gold = _gold_file(tmp_path, [("今天", ["O", "O"])])
    other = [_prediction("明天", ["O", "O"])]
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps(other, ensure_ascii=False)[1:-1] + "\n", encoding="utf-8")
    result = run("-m", "pipeline.report", "gold", str(predictions), str(gold))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: text 1 differs: {gold} has '今天', the predictions '明天'"]
    predictions.write_text("", encoding="utf-8")
    result = run("-m", "pipeline.report", "gold", str(predictions), str(gold))
    assert (result.returncode, result.stderr.strip()) == (2, f"error: {gold} holds 1 sentences, the predictions 0")
    predictions.write_text('{"text": "今天"\n', encoding="utf-8")  # cut off
    result = run("-m", "pipeline.report", "gold", str(predictions), str(gold))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {predictions}:1: not a line of predict.py's JSONL")
    predictions.write_text(json.dumps(other[0]) + '\n{"line": 2, "error": "no text"}\n', encoding="utf-8")
    result = run("-m", "pipeline.report", "gold", str(predictions), str(gold))  # predict.py's line for a rejected input
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {predictions}:2: not a prediction (predict.py writes text, labels and entities; this line has "
        "['error', 'line'])"]
    predictions.write_text(json.dumps(other[0], ensure_ascii=False) + "\n", encoding="utf-8")
    for missing in ([str(tmp_path / "none.jsonl"), str(gold)], [str(predictions), str(tmp_path / "none.tsv")]):
        result = run("-m", "pipeline.report", "gold", *missing)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "none." in result.stderr


def test_the_demos_gold_file_is_msra_ners_annotation_of_exactly_the_demo_sentences(tmp_path):
    """examples/paddlehub_demo_gold.tsv holds the four demo lines as MSRA-NER's training split annotates them
    (all four are MSRA training sentences; the entities below were read off the fetched corpus)."""
    from pipeline.readers import read_examples

    demo = (ROOT / "examples" / "paddlehub_demo.txt").read_text(encoding="utf-8").splitlines()
    examples, _ = read_examples(ROOT / "examples" / "paddlehub_demo_gold.tsv")
    assert ["".join(example.tokens) for example in examples] == demo
    entities = [[report.entity_name(entity) for entity in entities_of("".join(example.tokens), example.labels)]
                for example in examples]
    assert entities == [
        ["市委/ORG", "张敬涛/PER"],
        ["新华社/ORG", "北京/LOC", "国务院/ORG", "李岚清/PER", "中南海/LOC", "美国前商务部/ORG", "芭芭拉·弗兰克林/PER"],
        ["海卫1/LOC", "“旅行者”号探测器/LOC"],
        ["华/LOC", "韩素音/PER", "大足/LOC", "大足石窟/LOC"],
    ]
    # The main job's own check: a perfect prediction of the demo scores every gold entity and nothing else.
    perfect = [_prediction("".join(example.tokens), example.labels) for example in examples]
    lines = tmp_path / "demo_predictions.jsonl"
    lines.write_text("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in perfect), encoding="utf-8")
    result = run("-m", "pipeline.report", "gold", str(lines), str(ROOT / "examples" / "paddlehub_demo_gold.tsv"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "in all: 15 of 15 gold entities found, 0 spurious"
