"""pipeline.report and `train_dist.py --get`: the commands scripts/main_job.sh runs around training."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT
from pipeline import report
from pipeline.metrics import EntityCounts

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
