"""The README's Python API snippet, run verbatim (read from README.md at test time) on a tiny model.

The snippet names the offline defaults, "m3e-small" and "msra_ner": ``NERPIPE_HOME`` points at a
temporary asset cache whose two directories hold the tiny random BERT and a tiny PER/ORG/LOC corpus,
each with the completion marker the asset cache writes last, so nothing is fetched. It runs in its
own process, in a temporary working directory (its checkpoint_dir is relative).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, write_synthetic_splits
from pipeline.asset_cache import COMPLETE_MARKER, data_dir, model_dir
from pipeline.labels import MSRA_LABELS

HEADING = "From Python, the four steps of PaddleHub's demo"


def readme_snippet() -> str:
    """The first ```python block after the heading line, exactly as the README shows it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert HEADING in text, "the README no longer introduces the Python API snippet with this line"
    block = re.search(r"```python\n(.*?)```", text[text.index(HEADING):], re.DOTALL)
    assert block, "no ```python block after the heading"
    return block.group(1)


def predicted_texts(snippet: str) -> list[str]:
    """The list of texts the snippet passes to ``predict``."""
    calls = [node for node in ast.walk(ast.parse(snippet))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "predict"]
    assert len(calls) == 1
    return ast.literal_eval(calls[0].args[0])


@pytest.mark.slow
def test_the_readme_python_snippet_trains_and_predicts(tiny_model_dir, tmp_path):
    snippet = readme_snippet()
    cache, work = tmp_path / "cache", tmp_path / "work"
    model = model_dir("m3e-small", cache)
    shutil.copytree(tiny_model_dir, model)
    (model / COMPLETE_MARKER).write_text("a tiny random BERT for the README test\n", encoding="utf-8")
    # max_steps=100 of the default 32 sentences: one epoch, so one dev evaluation.
    data = write_synthetic_splits(data_dir("msra_ner", cache), {"train": 3200, "dev": 24, "test": 24})
    (data / COMPLETE_MARKER).write_text("a tiny synthetic corpus for the README test\n", encoding="utf-8")
    work.mkdir()
    env = {**os.environ, "NERPIPE_HOME": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)

    done = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out_dir = work / "outputs" / "msra_ner"  # TrainConfig's default checkpoint_dir, relative to the cwd
    for name in ("model.pdparams", "config.json", "vocab.txt", "pipeline.json", "train_config.yaml", "metrics.json"):
        assert (out_dir / "best_model" / name).is_file(), f"best_model/{name} missing"
    logged_steps = [line for line in (out_dir / "train_metrics.jsonl").read_text().splitlines() if line]
    assert json.loads(logged_steps[-1])["step"] == 100
    printed = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    (sentence,) = predicted_texts(snippet)
    assert len(printed) == 1
    result = printed[0]
    assert result["text"] == sentence
    assert len(result["labels"]) == len(sentence) and set(result["labels"]) <= set(MSRA_LABELS)
    for entity in result["entities"]:
        assert sentence[entity["start"]:entity["end"]] == entity["text"]
