"""predict.py at corpus scale: the summary's numbers, an unfinished output continued or refused, real
processes killed mid-way (SIGKILL, SIGTERM; one process and a two-rank paddle.distributed.launch) and
rerun, and the launch's output, all byte-identical to one uninterrupted process."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FILLER, PEOPLE, PLACES, ROOT, clean_env
from pipeline.stop_signals import RELAUNCH_EXIT_CODE

SUMMARY = re.compile(r"wrote (\d+) line\(s\) -> (\S+) \((\d+) predicted, (\d+) rejected, (\d+) entities\); "
                     r"this run: (\d+) sentence\(s\) in ([\d.]+) s, ([\d.]+) sentences/s(, continued after line "
                     r"(\d+))?$", re.MULTILINE)
CHUNK = "20"  # lines per process and commit: the killed runs below stop between many commits
LINES = 1500


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_checkpoint_dir):
    return tiny_checkpoint_dir


def corpus_bytes(lines: int, seed: int = 5) -> bytes:
    """Sentences of names, places and filler, with empty lines and lines of bytes that are not UTF-8."""
    rng = random.Random(seed)
    rows = []
    for number in range(lines):
        if number % 97 == 3:
            rows.append(b"")
        elif number % 131 == 7:
            rows.append("张三在".encode() + b"\xff\xfe" + "北京".encode())
        else:
            words = [rng.choice(PEOPLE + PLACES + [FILLER[rng.randrange(len(FILLER)):][:3]]) for _ in range(6)]
            rows.append("".join(words).encode())
    return b"\n".join(rows) + b"\n"


def summary_of(err: str) -> re.Match:
    matches = list(SUMMARY.finditer(err))
    assert len(matches) == 1, err[-3000:]
    return matches[0]


def run_main(args) -> int:
    import predict

    return predict.main(args)


def chunked_run_with_reference(checkpoint_dir, tmp_path, lines: int = 200, chunk_lines: int = 30):
    """(input, its uninterrupted output, the output to write, the command that writes it chunk by chunk)."""
    source = tmp_path / "in.txt"
    source.write_bytes(corpus_bytes(lines))
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    command = ["--checkpoint", str(checkpoint_dir), "--input", str(source), "--output", str(out), "--chunk_lines",
               str(chunk_lines)]
    assert run_main([*command[:5], str(reference)]) == 0
    return source, reference, out, command


def test_the_summary_counts_lines_entities_rejected_and_the_bar_knows_the_total(checkpoint_dir, tmp_path,
                                                                                 capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "\xe5\xbc\xa0\xe4\xb8\x89\xe5\x9c\xa8\xe5\x8c\x97\xe4\xba\xac"}\n'
                       b'{"text": "cut\n\n{"text": "caf\xe9 ok"}\n["a list"]\n{"text": "\xe6\x9d\x8e\xe5\x9b\x9b"}')
    out = tmp_path / "out.jsonl"
    assert run_main(["--checkpoint", str(checkpoint_dir), "--input", str(source), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    summary = summary_of(err)
    lines, output, predicted, rejected, entities, now = (summary[1], summary[2], summary[3], summary[4],
                                                         summary[5], summary[6])
    assert output == str(out) and int(lines) == len(records) == 6
    assert int(rejected) == sum("error" in r for r in records) == 2 and int(predicted) == int(now) == 4
    assert int(entities) == sum(len(r.get("entities", [])) for r in records) > 0
    assert float(summary[8]) > 0 and summary[9] is None  # nothing continued
    assert "6/6" in err  # the bar's total was counted first: the last line has no newline and still counts
    assert "lines [4]" in err  # the replaced bytes are still reported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no partial, no record


def interrupt_at_commit(monkeypatch, commit_number: int):
    """The run's commit_number-th commit raises KeyboardInterrupt, as Ctrl-C mid-way would."""
    from pipeline.files import ResumableLineFile

    real_commit, commits = ResumableLineFile.commit, []

    def commit(self, lines, state):
        commits.append(len(lines))
        if len(commits) == commit_number:
            raise KeyboardInterrupt
        real_commit(self, lines, state)

    monkeypatch.setattr(ResumableLineFile, "commit", commit)
    return commits


def test_an_interrupted_output_is_continued_or_refused_when_what_it_was_made_from_changed(checkpoint_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    source, reference, out, command = chunked_run_with_reference(checkpoint_dir, tmp_path)
    whole = summary_of(capsys.readouterr().err)
    with monkeypatch.context() as patch:
        interrupt_at_commit(patch, 4)
        assert run_main(command) == 130
    err = capsys.readouterr().err
    assert f"90 line(s) done in {out}.partial; rerun the same command to continue" in err
    assert not out.exists() and len(Path(f"{out}.partial").read_bytes().splitlines()) == 90

    def refused(args, reason, done=90):
        before = out.read_bytes() if out.exists() else None
        assert run_main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0] and lines[0].endswith("rerun with --overwrite to start over")
        assert len(Path(f"{out}.partial").read_bytes().splitlines()) == done  # untouched, as is any final file
        assert (out.read_bytes() if out.exists() else None) == before

    refused([*command, "--max_seq_len", "16"], "(90 lines done) was made with other settings than this run's: "
                                                 "max_seq_len None -> 16")
    copied = tmp_path / "copy" / "best_model"
    shutil.copytree(checkpoint_dir, copied)  # the same files, times and all: the same checkpoint
    weights = copied / "model.pdparams"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # as if retrained
    refused([command[0], str(copied), *command[2:]], "was made with other checkpoint than this run's")
    refused(["--checkpoint", str(checkpoint_dir), "--input", "-", "--output", str(out)], "was made with other input than this run's")
    # The same command continues after line 90; the whole file's counts, this run's speed.
    assert run_main(command) == 0
    err = capsys.readouterr().err
    assert f"continuing {out}.partial after its line 90" in err
    continued = summary_of(err)
    assert out.read_bytes() == reference.read_bytes()
    assert continued.group(1, 3, 4, 5) == whole.group(1, 3, 4, 5) and continued[10] == "90"
    assert int(continued[6]) == 200 - 90 - 0  # the lines this run predicted (none of these is rejected)
    assert "lines [8, 139]" in err  # the bytes replaced before the interruption are still named
    # A changed input is refused; --overwrite starts over.
    with monkeypatch.context() as patch:
        interrupt_at_commit(patch, 2)
        assert run_main(command) == 130
    with open(source, "ab") as handle:
        handle.write("王小明\n".encode())
    capsys.readouterr()
    refused(command, "(30 lines done) was made with other input than this run's: head_sha256", done=30)
    assert out.read_bytes() == reference.read_bytes()  # the finished output stays until a new one is complete
    assert run_main([*command, "--overwrite"]) == 0
    assert summary_of(capsys.readouterr().err)[1] == "201"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "in.txt", "out.jsonl", "reference.jsonl"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_ends_the_run_after_the_chunk_in_flight_with_the_relaunch_code(checkpoint_dir, tmp_path,
                                                                                     monkeypatch, capsys, signum):
    """The signal arrives while chunk 3 is being written (twice: the launcher repeats its SIGTERM): that chunk
    is committed, no later one is started, the run exits 75 saying so, and the same command continues."""
    from pipeline.files import ResumableLineFile

    source, reference, out, command = chunked_run_with_reference(checkpoint_dir, tmp_path)
    real_commit, commits = ResumableLineFile.commit, []

    def commit(self, lines, state):
        commits.append(len(lines))
        if len(commits) == 3:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        real_commit(self, lines, state)

    previous = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        patch.setattr(ResumableLineFile, "commit", commit)
        assert run_main(command) == RELAUNCH_EXIT_CODE
    assert signal.getsignal(signum) == previous  # the handlers are put back
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert (f"stopped on {name} after a whole chunk: 90 line(s) done in {out}.partial; rerun the same command to "
            f"continue (exit {RELAUNCH_EXIT_CODE})") in err
    assert len(commits) == 3 and len(Path(f"{out}.partial").read_bytes().splitlines()) == 90 and not out.exists()
    assert run_main(command) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert summary_of(capsys.readouterr().err)[10] == "90"


def test_an_unfinished_output_from_standard_input_is_refused_not_continued(checkpoint_dir, tmp_path, monkeypatch,
                                                                           capsys):
    import io

    out = tmp_path / "out.jsonl"
    command = ["--checkpoint", str(checkpoint_dir), "--input", "-", "--output", str(out), "--chunk_lines", "2"]
    text = "张三\n李四\n王小明\n赵敏\n".encode()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text), encoding="utf-8"))
        interrupt_at_commit(patch, 2)
        assert run_main(command) == 130
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text), encoding="utf-8"))
    capsys.readouterr()
    assert run_main(command) == 2
    assert "standard input, which cannot be continued" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text), encoding="utf-8"))
    assert run_main([*command, "--overwrite"]) == 0
    assert [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()] == \
        ["张三", "李四", "王小明", "赵敏"]


def test_the_launcher_refuses_workers_and_standard_streams():
    import predict

    def problem(*flags, world_size=2):
        return predict.launch_problem(predict.parse_args(["--checkpoint", "c", *flags]), world_size)

    assert "use --nproc_per_node N (CPU) or --gpus instead of --workers" in problem("--input", "a", "--workers", "2",
                                                                                     "--output", "b")
    assert "must be files" in problem("--input", "-", "--output", "b")
    assert "must be files" in problem("--input", "a")  # the output defaults to standard output
    assert problem("--input", "a", "--output", "b") is None
    assert problem("--input", "-", "--workers", "2", world_size=1) is None  # one process: as before


# --- real processes: a two-rank launch, and runs killed mid-way then rerun ---


@pytest.fixture(scope="module")
def corpus(checkpoint_dir, tmp_path_factory):
    """A corpus, and its output and summary from one uninterrupted process."""
    import predict

    directory = tmp_path_factory.mktemp("corpus")
    source, reference = directory / "in.txt", directory / "reference.jsonl"
    source.write_bytes(corpus_bytes(LINES))
    assert predict.main(["--checkpoint", str(checkpoint_dir), "--input", str(source), "--output",
                         str(reference)]) == 0
    return source, reference


def predict_command(checkpoint_dir, source, out, ranks: int, log_dir: Path) -> list[str]:
    script = ["predict.py", "--checkpoint", str(checkpoint_dir), "--input", str(source), "--output", str(out),
              "--chunk_lines", CHUNK]
    if ranks == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(ranks), "--log_dir",
            str(log_dir), *script]


def rank0_log(ranks: int, done: subprocess.CompletedProcess, log_dir: Path) -> str:
    return done.stderr if ranks == 1 else (log_dir / "workerlog.0").read_text(encoding="utf-8")


def run_to_the_end(command, ranks: int, log_dir: Path) -> str:
    done = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    log = rank0_log(ranks, done, log_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log[-3000:]
    return log


def committed_lines(out: Path) -> int:
    try:
        return json.loads(Path(f"{out}.progress.json").read_text(encoding="utf-8"))["lines"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_a_two_rank_launch_writes_what_one_process_writes(checkpoint_dir, corpus, tmp_path):
    source, reference = corpus
    out, log_dir = tmp_path / "out.jsonl", tmp_path / "logs"
    log = run_to_the_end(predict_command(checkpoint_dir, source, out, 2, log_dir), 2, log_dir)
    assert out.read_bytes() == reference.read_bytes()
    summary = summary_of(log)
    assert summary[1] == str(LINES) and summary[6] == str(LINES)
    # Rank 1 predicted its shares but wrote nothing and reported nothing.
    assert not SUMMARY.search((log_dir / "workerlog.1").read_text(encoding="utf-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "out.jsonl"]


def kill_every_process_of(job: subprocess.Popen) -> None:
    """SIGKILL the job and all its descendants at once: the launcher puts each worker in a session of its
    own (setsid), so a process group kill would miss them."""
    import psutil

    launcher = psutil.Process(job.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("ranks, how", [(1, signal.SIGKILL), (1, signal.SIGTERM), (2, signal.SIGKILL),
                                        (2, signal.SIGTERM)])
def test_a_run_killed_mid_way_and_rerun_writes_what_an_uninterrupted_run_writes(checkpoint_dir, corpus, tmp_path,
                                                                                 ranks, how):
    """SIGKILL: the process (one process) or every process of the launch at once (as a scheduler or a lost
    node ends it). SIGTERM: the process (one process, which finishes the chunk in flight, says how far it
    got and exits 75) or the launcher, which passes it on to its workers. The same command then continues
    after the last complete chunk."""
    import psutil

    source, reference = corpus
    out = tmp_path / "out.jsonl"
    command = predict_command(checkpoint_dir, source, out, ranks, tmp_path / "logs-killed")
    job = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 300
        while committed_lines(out) < 200:  # well under way, far from the end
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "prediction never started"
            time.sleep(0.05)
        if how == signal.SIGKILL and ranks > 1:
            kill_every_process_of(job)
        else:
            os.kill(job.pid, how)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            kill_every_process_of(job)
    deadline = time.monotonic() + 60  # the launcher's workers end with it
    while any(str(out) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "a prediction process outlived the kill"
        time.sleep(0.2)
    done = committed_lines(out)
    assert not out.exists() and 200 <= done < LINES, done  # killed mid-way: no final file
    assert job.returncode != 0
    if how == signal.SIGTERM:  # a graceful stop: whole chunks only
        assert done % int(CHUNK) == 0, done
    if ranks == 1 and how == signal.SIGTERM:
        assert job.returncode == RELAUNCH_EXIT_CODE
        assert (f"stopped on SIGTERM after a whole chunk: {done} line(s) done in {out}.partial; rerun the same "
                f"command to continue (exit {RELAUNCH_EXIT_CODE})") in err, err
    if how == signal.SIGKILL:
        with open(f"{out}.partial", "ab") as handle:
            handle.write('{"text": "张三在'.encode())  # as a kill in the middle of a write leaves it
    log = run_to_the_end(predict_command(checkpoint_dir, source, out, ranks, tmp_path / "logs-rerun"), ranks,
                         tmp_path / "logs-rerun")
    assert out.read_bytes() == reference.read_bytes()  # no line lost, none twice, none torn
    summary = summary_of(log)
    assert summary[1] == str(LINES) and summary[10] == str(done)
    assert int(summary[6]) == LINES - done  # this run predicted the rest (a text input rejects no line)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("logs")) == ["out.jsonl"]


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_after_the_same_chunk_and_the_rerun_writes_the_uninterrupted_output(
        checkpoint_dir, corpus, tmp_path):
    """Slurm's warning before the time limit, or a signal that reached one node only: rank 1 alone gets it.
    Its request travels with the chunk's results, rank 0 writes that chunk and tells rank 1 to stop, and
    both exit 75, as does the launcher; the same command then continues to the uninterrupted output."""
    import psutil

    source, reference = corpus
    out, log_dir = tmp_path / "out.jsonl", tmp_path / "logs-stopped"
    job = subprocess.Popen(predict_command(checkpoint_dir, source, out, 2, log_dir), cwd=ROOT, env=clean_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while committed_lines(out) < 200:
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "prediction never started"
            time.sleep(0.05)
        ranks = {int(p.environ().get("PADDLE_TRAINER_ID", -1)): p for p in psutil.Process(job.pid).children()}
        ranks[1].send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            kill_every_process_of(job)
    done = committed_lines(out)
    rank0 = (log_dir / "workerlog.0").read_text(encoding="utf-8")
    assert job.returncode == RELAUNCH_EXIT_CODE, err[-2000:] + rank0[-2000:]
    assert done % (2 * int(CHUNK)) == 0 and 200 <= done < LINES, done  # whole chunks of both ranks
    assert (f"stopped on another rank's stop signal after a whole chunk: {done} line(s) done in {out}.partial; "
            "rerun the same command to continue") in rank0
    assert not out.exists()
    log = run_to_the_end(predict_command(checkpoint_dir, source, out, 2, tmp_path / "logs-rerun"), 2,
                         tmp_path / "logs-rerun")
    assert out.read_bytes() == reference.read_bytes()
    assert summary_of(log)[10] == str(done)
