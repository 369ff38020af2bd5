"""A real two-node job on one machine: two `paddle.distributed.launch` processes, one per "node",
meeting at a rendezvous on 127.0.0.1, each node with its own log directory and checkpoint_dir
(storage that is not shared)."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, clean_env, overrides

TIMEOUT = 300
DIGEST = re.compile(r"\[rank (\d+)\] final weights sha256 ([0-9a-f]{64})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_command(rank: int, port: int, log_dir: Path, train_args: list[str], master: str = "127.0.0.1",
                 host: str | None = None, namespace: str | None = None) -> list[str]:
    prefix = []
    if namespace:
        # Gloo picks its interface from the host name, which resolves to loopback: name the veth instead.
        device = f"nerpipe-veth{NAMESPACES.index(namespace)}"
        prefix = ["ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={device}"]
    return [*prefix, sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2",
            "--master", f"{master}:{port}", *(["--host", host] if host else []),
            "--rank", str(rank), "--nproc_per_node", "1", "--job_id", f"test-{port}", "--log_dir", str(log_dir),
            "--max_restart", "0", "train_dist.py", *train_args]


def run_nodes(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start every node, wait for all under one deadline; on timeout kill them all and fail."""
    procs = [subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for command in commands]
    deadline = time.monotonic() + TIMEOUT
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [proc.communicate()[0][-3000:] for proc in procs]
        pytest.fail(f"two-node job did not finish in {TIMEOUT} s:\n" + "\n---\n".join(tails))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [subprocess.CompletedProcess(c, p.returncode, o, "") for c, p, o in zip(commands, procs, outputs)]


# Two test hosts, each in its own network namespace, joined by a veth pair. The addresses are from
# TEST-NET-1 (RFC 5737, never routed) and exist only inside these namespaces.
NAMESPACES = ("nerpipe-node0", "nerpipe-node1")
ADDRESSES = ("192.0.2.10", "192.0.2.11")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Create the namespaces and the veth link; skip with the reason when the machine refuses."""
    for namespace in NAMESPACES:  # leftovers of an interrupted run
        _ip("netns", "del", namespace)
    steps = [("netns", "add", NAMESPACES[0]), ("netns", "add", NAMESPACES[1]),
             ("link", "add", "nerpipe-veth0", "type", "veth", "peer", "name", "nerpipe-veth1")]
    for index, namespace in enumerate(NAMESPACES):
        device = f"nerpipe-veth{index}"
        steps += [("link", "set", device, "netns", namespace),
                  ("-n", namespace, "addr", "add", f"{ADDRESSES[index]}/24", "dev", device),
                  ("-n", namespace, "link", "set", device, "up"),
                  ("-n", namespace, "link", "set", "lo", "up")]
    try:
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"network namespaces unavailable here: `ip {' '.join(step)}` said "
                            f"{result.stderr.strip()!r}")
        yield
    except FileNotFoundError:
        pytest.skip("iproute2 (`ip`) is not installed")
    finally:
        for namespace in NAMESPACES:  # deleting a namespace also removes its end of the veth pair
            _ip("netns", "del", namespace)


def check_two_node_run(results, log_dirs, out_dirs):
    """Both nodes succeeded, ended with identical weights, and only global rank 0 wrote."""

    logs = {rank: (log_dirs[rank] / "workerlog.0").read_text() if (log_dirs[rank] / "workerlog.0").is_file() else ""
            for rank in (0, 1)}
    for rank, result in enumerate(results):
        assert result.returncode == 0, (f"node {rank} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                                        f"workerlog.0:\n{logs[rank][-3000:]}")
    # One worker per node: global rank 0 on node 0, global rank 1 on node 1, each logging as workerlog.0.
    digests = {}
    for node, text in logs.items():
        found = DIGEST.findall(text)
        assert len(found) == 1, f"node {node}: expected one final-weights line, got {found}"
        global_rank, digest = found[0]
        assert int(global_rank) == node
        digests[node] = digest
    assert digests[0] == digests[1], "replicas on the two nodes ended with different weights"

    # Storage is not shared here: only global rank 0 writes, so only node 0's checkpoint_dir has a model,
    # and node 1 still ends with the best weights because rank 0 broadcasts them.
    assert (out_dirs[0] / "best_model" / "model.pdparams").is_file()
    assert not (out_dirs[1] / "best_model").exists()
    assert "saved to" in logs[0]
    assert "saved to" not in logs[1]


@pytest.mark.slow
def test_two_nodes_on_loopback(tiny_model_dir, tiny_dataset_dir, tmp_path):
    port = free_port()
    log_dirs = [tmp_path / f"log-node{rank}" for rank in (0, 1)]
    out_dirs = [tmp_path / f"ckpt-node{rank}" for rank in (0, 1)]
    commands = [node_command(rank, port, log_dirs[rank], overrides(tiny_model_dir, tiny_dataset_dir, out_dirs[rank]))
                for rank in (0, 1)]
    check_two_node_run(run_nodes(commands), log_dirs, out_dirs)


@pytest.mark.slow
def test_two_nodes_across_network_namespaces(two_hosts, tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The same job with each node on its own address: the traffic really crosses an interface."""
    port = 36123  # inside fresh namespaces every port is free
    log_dirs = [tmp_path / f"log-node{rank}" for rank in (0, 1)]
    out_dirs = [tmp_path / f"ckpt-node{rank}" for rank in (0, 1)]
    commands = [node_command(rank, port, log_dirs[rank], overrides(tiny_model_dir, tiny_dataset_dir, out_dirs[rank]),
                             master=ADDRESSES[0], host=ADDRESSES[rank], namespace=NAMESPACES[rank])
                for rank in (0, 1)]
    results = run_nodes(commands)
    check_two_node_run(results, log_dirs, out_dirs)
    # Node 1 reached node 0's rendezvous through the veth link, at node 0's namespace address.
    node1_output = results[1].stdout + "".join(p.read_text(errors="replace") for p in log_dirs[1].glob("*"))
    assert f"connected to {ADDRESSES[0]}" in node1_output, node1_output[-2000:]


# train_dist.py as it is, except that pipeline.dist.shutdown says when it has torn the process group down.
# (Paddle is imported before train_dist.py applies its CPU settings: harmless for this error path.)
SAYS_WHEN_IT_LEAVES = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
from pipeline import dist

real_shutdown = dist.shutdown

def shutdown():
    real_shutdown()
    print("left the process group together with every rank", flush=True)

dist.shutdown = shutdown
sys.argv = ["train_dist.py", *sys.argv[1:]]
runpy.run_path("train_dist.py", run_name="__main__")
"""


@pytest.mark.slow
def test_nodes_that_see_different_training_states_stop_with_one_line_and_exit_2(tiny_model_dir, tiny_dataset_dir,
                                                                                 tmp_path):
    """Storage that is not shared: node 0 has training states, node 1 none. The relaunch must stop on
    both nodes with the reason in one line and exit 2, which launch/local.sh does not retry.

    Both ranks must leave the process group together (barrier, then destroy) before they exit: rank 0
    hosts the rendezvous store, and without it the job once ended with rank 0 aborting at exit (-6)
    after printing the error. That race is rare; the test checks the teardown it needs."""
    out_dirs = [tmp_path / f"ckpt-node{rank}" for rank in (0, 1)]
    says_when_it_leaves = tmp_path / "says_when_it_leaves.py"
    says_when_it_leaves.write_text(SAYS_WHEN_IT_LEAVES)

    def job(name: str, **extra):
        port = free_port()
        log_dirs = [tmp_path / f"{name}-log-node{rank}" for rank in (0, 1)]
        commands = [node_command(rank, port, log_dirs[rank], overrides(tiny_model_dir, tiny_dataset_dir,
                                                                       out_dirs[rank], save_interval=2, **extra))
                    for rank in (0, 1)]
        for command in commands:
            command[command.index("train_dist.py")] = str(says_when_it_leaves)
        return run_nodes(commands), log_dirs

    results, _ = job("first", do_test=False)
    assert [result.returncode for result in results] == [0, 0]
    assert (out_dirs[0] / "checkpoints" / "step-00000004").is_dir() and not (out_dirs[1] / "checkpoints").exists()
    results, log_dirs = job("again", do_test=False, max_steps=6)
    for rank, result in enumerate(results):
        log = (log_dirs[rank] / "workerlog.0").read_text()
        assert result.returncode == 2, f"node {rank} exited {result.returncode}\n{result.stdout[-2000:]}\n{log[-2000:]}"
        assert "ranks see different training states" in log and "newest step on any rank: 4" in log, log[-2000:]
        assert "Traceback" not in log, log[-3000:]
        assert "left the process group together with every rank" in log, log[-2000:]
    assert not (out_dirs[0] / "run.lock").exists()  # rank 0 gave its lock back
