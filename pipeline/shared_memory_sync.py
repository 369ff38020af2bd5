"""The gradient all-reduce of CPU workers on one machine, through shared memory instead of gloo.

Why: on CPU, ``paddle.DataParallel`` all-reduces gradients with gloo, which sends them over TCP even
between two processes of one machine. For m3e-small's 13.2M dense gradients that took 46 ms a step on
two workers (BENCHMARKS.md), most of it copying through the kernel's socket buffers. Workers that share
a machine can instead add each other's gradients where they lie: here every rank maps one file in
``/dev/shm``, which holds a slot per rank and a result area, each as long as all synced gradients.

A sync (collective, after the backward that ends an accumulation group):

1. each rank writes its gradients, divided by the number of ranks, into its slot;
2. barrier;
3. rank r adds the r-th of N equal stretches of all slots, in rank order, into the result area;
4. barrier;
5. each rank copies the result into its gradients.

Dividing before adding is what DataParallel does, so with two ranks the sums are the same numbers as
gloo's (``tests/test_train_launch.py`` compares the trained weights' sha256). Each rank reads and
writes about four times the gradients' size, whatever the number of ranks (a reduce-scatter, then a
gather by reading): no traffic grows with N.

The file is removed as soon as every rank has mapped it, so nothing is left in ``/dev/shm`` when a
worker dies. Where the ranks cannot all map one file (several machines, no ``/dev/shm``, not enough
room in it), every rank keeps DataParallel's gloo all-reduce and the log says why.

Float32 CPU training only (the trainer's ``cpu_float32`` condition): NCCL's all-reduce is GPUs' own.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
from pathlib import Path

import numpy as np
import paddle

from . import dist

logger = logging.getLogger(__name__)

SHARED_MEMORY_DIR = Path("/dev/shm")
# Written at the start of the file by rank 0 and checked by the others: a rank that opens a file of
# the same name on another machine's /dev/shm (impossible with a random name, but cheap to rule out)
# or a truncated file refuses it.
TOKEN_BYTES = 16
# Stretches start on 64-byte cache lines, so two ranks never write into the same line at once.
ALIGN = 16


class SharedMemoryUnavailable(RuntimeError):
    """The ranks cannot share one mapped file; the reason is the message."""


def _segment_bytes(values: int, world_size: int) -> int:
    return ALIGN * 4 + (world_size + 1) * _aligned(values) * 4


def _aligned(values: int) -> int:
    return -(-values // ALIGN) * ALIGN


def create_segment(size: int, directory: Path = SHARED_MEMORY_DIR) -> tuple[Path, bytes]:
    """A new file of ``size`` bytes in ``directory``, its memory reserved, with a random token at its start.

    Reserved with ``posix_fallocate``: a tmpfs file written past the room left in it kills the writer
    with SIGBUS, long after this point; reserving fails here instead, with ENOSPC.
    """
    if not directory.is_dir():
        raise SharedMemoryUnavailable(f"{directory} does not exist")
    token = secrets.token_bytes(TOKEN_BYTES)
    path = directory / f"nerpipe-gradients-{os.getpid()}-{token.hex()[:12]}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise SharedMemoryUnavailable(f"cannot create {path}: {error.strerror}") from error
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, token, 0)
    except OSError as error:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise SharedMemoryUnavailable(f"cannot reserve {size / 2**20:.0f} MiB in {directory}: "
                                      f"{error.strerror}") from error
    os.close(fd)
    return path, token


def map_segment(path: Path, token: bytes, size: int) -> mmap.mmap:
    """``path`` mapped shared, read-write, after checking its size and token."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as error:
        raise SharedMemoryUnavailable(f"cannot open {path}: {error.strerror}") from error
    try:
        if os.fstat(fd).st_size != size or os.pread(fd, TOKEN_BYTES, 0) != token:
            raise SharedMemoryUnavailable(f"{path} is not the file rank 0 created")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class SharedMemoryGradientSync:
    """Averages ``parameters``' gradients over the ranks through one shared file (see the module docstring).

    Build it with ``for_parameters`` (collective); call ``all_reduce`` on every rank after the backward
    that ends an accumulation group, before the gradients are read.
    """

    def __init__(self, parameters: list, memory: mmap.mmap, rank: int, world_size: int):
        self.parameters = parameters
        self.rank, self.world_size = rank, world_size
        self._memory = memory
        self.values = sum(int(p.size) for p in parameters)
        stride = _aligned(self.values)
        flat = np.frombuffer(memory, dtype=np.float32, offset=ALIGN * 4, count=(world_size + 1) * stride)
        areas = flat.reshape(world_size + 1, stride)
        self._slots, self._result = areas[:world_size, :self.values], areas[world_size, :self.values]
        self._offsets = np.cumsum([0] + [int(p.size) for p in parameters]).tolist()
        # Paddle tensors over the result area, one per parameter, to copy each gradient back in one call.
        self._results = [paddle.utils.dlpack.from_dlpack(self._result[start:end].reshape(p.shape))
                         for p, start, end in zip(parameters, self._offsets, self._offsets[1:])]
        share = _aligned(-(-self.values // world_size))
        self._stretch = slice(min(rank * share, self.values), min((rank + 1) * share, self.values))
        self._scale = np.float32(1.0 / world_size)

    @classmethod
    def for_parameters(cls, parameters: list, directory: Path = SHARED_MEMORY_DIR
                       ) -> tuple["SharedMemoryGradientSync | None", str]:
        """The sync of ``parameters`` (float32) on every rank, or (None, why not) on every rank; collective.

        Rank 0 creates the file; every rank maps it and says whether it could; the file is removed once
        all have it mapped. The ranks decide together, so either all use it or none does.
        """
        world_size, rank = dist.get_world_size(), dist.get_rank()
        size = _segment_bytes(sum(int(p.size) for p in parameters), world_size)
        created = reason = None
        if rank == 0:
            try:
                created = create_segment(size, directory)
            except SharedMemoryUnavailable as error:
                reason = str(error)
        created, reason = dist.broadcast_object((created, reason))
        memory = None
        if created is not None:
            try:
                memory = map_segment(*created, size)
            except SharedMemoryUnavailable as error:
                reason = str(error)
        failures = [why for why in dist.all_gather_objects(None if memory else (reason or "no segment"))
                    if why is not None]
        if rank == 0 and created is not None:
            created[0].unlink(missing_ok=True)  # every rank has mapped it, or none will use it
        if failures:
            if memory is not None:
                memory.close()
            return None, failures[0]
        return cls(parameters, memory, rank, world_size), f"{size / 2**20:.0f} MiB, {created[0]}, removed once mapped"

    @paddle.no_grad()
    def all_reduce(self) -> None:
        """Average the gradients over the ranks (collective); a rank without a gradient adds zeros."""
        slot = self._slots[self.rank]
        for parameter, start, end in zip(self.parameters, self._offsets, self._offsets[1:]):
            grad = parameter.grad
            if grad is None:
                slot[start:end] = 0
            else:
                np.multiply(np.from_dlpack(grad.detach()).reshape(-1), self._scale, out=slot[start:end])
        dist.barrier()
        stretch = self._stretch
        if stretch.stop > stretch.start:
            result = self._result[stretch]
            np.add(self._slots[0, stretch], self._slots[1, stretch], out=result)
            for other in range(2, self.world_size):
                np.add(result, self._slots[other, stretch], out=result)
        dist.barrier()
        for parameter, result in zip(self.parameters, self._results):
            grad = parameter.grad
            if grad is not None:
                paddle.assign(result, output=grad)

    def close(self) -> None:
        """Unmap the file (its memory is freed when the last rank does); the sync is unusable after."""
        self._results = []
        self._slots = self._result = None
        try:
            self._memory.close()
        except BufferError:  # a view of it is still referenced somewhere: unmapped when that goes
            pass


def shared_memory_gradient_sync(model: paddle.nn.Layer, enabled: bool, cpu_float32: bool
                                ) -> SharedMemoryGradientSync | None:
    """The shared-memory sync of ``model``'s trainable parameters that DataParallel would all-reduce
    (not those marked ``no_sync``), or None: one process, not CPU float32, turned off, or unavailable
    (then logged). Collective when it can apply: every rank must call it with the same arguments."""
    if not (enabled and cpu_float32 and dist.is_initialized()):
        return None
    parameters = [p for p in model.parameters() if not p.stop_gradient and not getattr(p, "no_sync", False)]
    if not parameters or any(p.dtype != paddle.float32 for p in parameters):
        return None
    sync, detail = SharedMemoryGradientSync.for_parameters(parameters)
    if dist.is_main_process():
        if sync is None:
            logger.warning("gradients: all-reduced with gloo, shared memory is not available (%s)", detail)
        else:
            logger.info("gradients: %d workers add %.1fM gradient values in shared memory (%s), not over gloo",
                        sync.world_size, sync.values / 1e6, detail)
    return sync
