"""The run log on resume: histories cut back to the state resumed from, a torn last line tolerated."""
from __future__ import annotations

import json
import logging

from pipeline.run_log import DEV_HISTORY_FILE, TRAIN_HISTORY_FILE, RunLog


def test_truncate_keeps_steps_up_to_the_state_and_drops_a_torn_last_line(tmp_path, caplog):
    train_log = tmp_path / TRAIN_HISTORY_FILE
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    train_log.write_text("\n".join(lines) + '\n{"step": 6, "lo', encoding="utf-8")  # killed mid-append
    history = [{"step": 2, "f1": 0.5}, {"step": 4, "f1": 0.6}]
    with caplog.at_level(logging.WARNING):
        RunLog(tmp_path, is_main=True, use_vdl=False).truncate(history, step=4)
    assert [json.loads(line)["step"] for line in train_log.read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(line) for line in (tmp_path / DEV_HISTORY_FILE).read_text().splitlines()] == history
    assert "dropped unreadable line(s) [6]" in caplog.text


def test_truncate_does_nothing_on_other_ranks(tmp_path):
    train_log = tmp_path / TRAIN_HISTORY_FILE
    train_log.write_text('{"step": 9}\n', encoding="utf-8")
    RunLog(tmp_path, is_main=False, use_vdl=False).truncate([], step=1)
    assert train_log.read_text() == '{"step": 9}\n' and not (tmp_path / DEV_HISTORY_FILE).exists()
