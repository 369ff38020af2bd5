"""pipeline.shared_memory_sync: the shared file's life and the sync's arithmetic, in one process.

The ranks' real exchange (two workers under paddle.distributed.launch, the same weights as
DataParallel's gloo all-reduce) is in tests/test_train_launch.py.
"""
from __future__ import annotations

import errno
import os
import threading

import numpy as np
import paddle
import pytest

from pipeline import dist, shared_memory_sync as sms


def test_create_segment_reserves_the_size_and_writes_a_token(tmp_path):
    path, token = sms.create_segment(4096, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("nerpipe-gradients-")
    assert path.stat().st_size == 4096 and path.read_bytes()[:sms.TOKEN_BYTES] == token
    memory = sms.map_segment(path, token, 4096)
    memory[100:104] = b"abcd"
    assert path.read_bytes()[100:104] == b"abcd"  # shared: a write through the map is in the file
    memory.close()


def test_a_segment_without_room_is_refused_before_any_write(tmp_path, monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(sms.SharedMemoryUnavailable, match=r"cannot reserve 1 MiB in .*No space left"):
        sms.create_segment(2**20, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_missing_directory_or_another_file_is_refused(tmp_path):
    with pytest.raises(sms.SharedMemoryUnavailable, match="does not exist"):
        sms.create_segment(4096, tmp_path / "absent")
    path, token = sms.create_segment(4096, tmp_path)
    with pytest.raises(sms.SharedMemoryUnavailable, match="not the file rank 0 created"):
        sms.map_segment(path, b"x" * sms.TOKEN_BYTES, 4096)
    with pytest.raises(sms.SharedMemoryUnavailable, match="not the file rank 0 created"):
        sms.map_segment(path, token, 8192)
    with pytest.raises(sms.SharedMemoryUnavailable, match="cannot open"):
        sms.map_segment(tmp_path / "gone", token, 4096)


def _ranks_of_one_process(monkeypatch, world_size: int):
    """The collectives of ``world_size`` ranks run as threads of this process: a real barrier, broadcasts
    and gathers through shared lists, and the rank read from the calling thread."""
    barrier = threading.Barrier(world_size, timeout=60)
    local = threading.local()
    box: dict = {}

    def gather(value):
        box.setdefault("gather", [None] * world_size)[local.rank] = value
        barrier.wait()
        gathered = list(box["gather"])
        barrier.wait()
        return gathered

    def broadcast(value, src=0):
        return gather(value)[src]

    monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
    monkeypatch.setattr(dist, "get_rank", lambda: local.rank)
    monkeypatch.setattr(dist, "barrier", lambda: barrier.wait())
    monkeypatch.setattr(dist, "broadcast_object", broadcast)
    monkeypatch.setattr(dist, "all_gather_objects", gather)
    return local


def _run_ranks(local, world_size, work):
    results, errors = [None] * world_size, []

    def rank_main(rank):
        local.rank = rank
        try:
            results[rank] = work(rank)
        except Exception as error:  # noqa: BLE001 - reraised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_ends_with_the_average_of_all_ranks_gradients(monkeypatch, tmp_path, world_size):
    # Three parameters of odd sizes, so that the ranks' stretches cut through parameters; a fourth
    # without a gradient on rank 1 (it adds zeros there and keeps none).
    local = _ranks_of_one_process(monkeypatch, world_size)
    shapes = [[7, 5], [13], [3, 2, 3], [4]]
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(shape).astype(np.float32) for shape in shapes] for _ in range(world_size)]
    grads[1][3] = None

    def work(rank):
        parameters = [paddle.create_parameter(shape, "float32") for shape in shapes]
        sync, detail = sms.SharedMemoryGradientSync.for_parameters(parameters, tmp_path)
        assert sync is not None, detail
        out = []
        for step in range(2):  # twice: the second reuses the file's areas
            for parameter, grad in zip(parameters, grads[rank]):
                if grad is not None:
                    (parameter * paddle.to_tensor(grad * (step + 1))).sum().backward()
            sync.all_reduce()
            out.append([None if p.grad is None else p.grad.numpy().copy() for p in parameters])
            for parameter in parameters:
                parameter.clear_gradient(set_to_zero=False)
        sync.close()
        return out

    results = _run_ranks(local, world_size, work)
    assert list(tmp_path.iterdir()) == []  # removed once every rank had it mapped
    for step in range(2):
        for index in range(len(shapes)):
            contributions = [g[index] * np.float32(step + 1) * np.float32(1.0 / world_size)
                             for g in grads if g[index] is not None]
            expected = contributions[0]
            for contribution in contributions[1:]:
                expected = expected + contribution
            for rank in range(world_size):
                got = results[rank][step][index]
                if grads[rank][index] is None:
                    assert got is None
                else:
                    np.testing.assert_allclose(got, expected, rtol=1e-6)
                    if world_size == 2:  # each half, then their sum: exactly what gloo computes for two ranks
                        np.testing.assert_array_equal(got, expected)


def test_when_one_rank_cannot_map_the_file_no_rank_uses_it(monkeypatch, tmp_path):
    local = _ranks_of_one_process(monkeypatch, 2)
    real_map = sms.map_segment

    def map_on_rank_0_only(path, token, size):
        if local.rank == 1:
            raise sms.SharedMemoryUnavailable(f"cannot open {path}: No such file or directory")
        return real_map(path, token, size)

    monkeypatch.setattr(sms, "map_segment", map_on_rank_0_only)

    def work(rank):
        return sms.SharedMemoryGradientSync.for_parameters([paddle.create_parameter([4], "float32")], tmp_path)

    results = _run_ranks(local, 2, work)
    assert [sync for sync, _ in results] == [None, None]
    assert all("cannot open" in why for _, why in results)
    assert list(tmp_path.iterdir()) == []


def test_it_applies_only_to_cpu_float32_workers(monkeypatch):
    model = paddle.nn.Linear(3, 2)
    assert sms.shared_memory_gradient_sync(model, True, True) is None  # one process
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    built = []
    monkeypatch.setattr(sms.SharedMemoryGradientSync, "for_parameters",
                        classmethod(lambda cls, parameters: (built.append(parameters), (None, "test"))[1]))
    assert sms.shared_memory_gradient_sync(model, False, True) is None
    assert sms.shared_memory_gradient_sync(model, True, False) is None  # a GPU, or AMP
    assert built == []
    model.bias.no_sync = True  # the row-wise embedding sync's mark: left to that sync
    sms.shared_memory_gradient_sync(model, True, True)
    assert [p.name for p in built[0]] == [model.weight.name]
