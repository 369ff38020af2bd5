"""Everything distributed, in one place: the only module that imports ``paddle.distributed``.

Every helper also works in a single process with no process group (rank 0 of
a world of 1), so the same training code runs under ``python train_dist.py``
and under ``python -m paddle.distributed.launch``.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import paddle
import paddle.distributed as dist


def launched_world_size() -> int:
    """World size announced by Paddle's launcher (1 when run directly)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def init_distributed(on_gpu: bool) -> None:
    """Join the process group when started by the launcher with more than one worker.

    ``on_gpu``: whether this worker trains on its GPU. On CPU the gloo backend is forced: on a CUDA build
    under a launcher that assigned cards, ``init_parallel_env`` would otherwise pick NCCL and move the
    default place to the GPU (its 'auto' backend, ``distributed/parallel.py``), whatever use_gpu said.
    """
    if launched_world_size() > 1 and not is_initialized():
        if not on_gpu:
            os.environ["PADDLE_DISTRI_BACKEND"] = "gloo"  # read by init_parallel_env
        dist.init_parallel_env()


def is_initialized() -> bool:
    """Whether a process group with more than one worker exists."""
    return dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Number of workers (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    """Global rank of this worker (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0, the only rank with side effects (files, logs, bars)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; follows every rank-0 write that other ranks may read."""
    if is_initialized():
        dist.barrier()


def _all_reduce(values: np.ndarray, op) -> np.ndarray:
    if not is_initialized():
        return np.asarray(values)
    tensor = paddle.to_tensor(np.asarray(values))
    dist.all_reduce(tensor, op=op)
    return tensor.numpy()


def all_gather_objects(value) -> list:
    """Every rank's ``value`` (picklable), in rank order; collective."""
    if not is_initialized():
        return [value]
    gathered: list = []
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value, src: int = 0):
    """``value`` as rank ``src`` holds it (picklable), on every rank; collective."""
    if not is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def scatter_objects(values: list | None, src: int = 0):
    """This rank's item of ``values`` (one picklable item per rank, read on rank ``src`` only); collective."""
    if not is_initialized():
        return values[0]
    received: list = []
    dist.scatter_object_list(received, values if get_rank() == src else None, src=src)
    return received[0]


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a numeric array over all ranks (identity in one process)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: np.ndarray) -> np.ndarray:
    """Element-wise maximum over all ranks (identity in one process)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def broadcast_parameters(model: paddle.nn.Layer, src: int = 0) -> None:
    """Copy every parameter and buffer from rank ``src`` to all ranks.

    Used after rank 0 alone reads the best model from disk, so that other
    nodes never need to see a file that may exist only on rank 0's node.
    """
    if not is_initialized():
        return
    with paddle.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, src=src)


def shutdown() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Without this, a rank that exits while its peers still hold connections to
    the rendezvous store it hosts can abort at exit (seen as exit code -6 in
    a two-node run on one machine) after all its work was done.
    """
    if not is_initialized():
        return
    dist.barrier()
    destroy = getattr(dist, "destroy_process_group", None)
    if destroy is not None:
        destroy()


def wrap_for_training(model: paddle.nn.Layer, data_parallel: bool = True) -> paddle.nn.Layer:
    """``paddle.DataParallel`` around the model when there are several workers.

    ``data_parallel=False``: the caller all-reduces the gradients itself (``pipeline.shared_memory_sync``);
    the model is returned as it is, after the broadcast of rank 0's weights that DataParallel would do.
    """
    if not is_initialized():
        return model
    if not data_parallel:
        broadcast_parameters(model)
        return model
    return paddle.DataParallel(model)


class EmbeddingRowSync:
    """All-reduces only the used rows of a word-embedding gradient; DataParallel skips that table.

    A batch's embedding gradient is zero outside the rows of its token ids, so the rows no rank used
    sum to zero: all-reducing only the union of the used rows gives the same averaged gradient as
    DataParallel's dense all-reduce of the whole table (m3e-small: 10.8M of its 24M gradient
    values, about 35 ms of gloo time per step on two CPU workers), for the cost of one all-reduce of a
    vocabulary-sized mask. For CPU workers, whose gloo all-reduce is the bottleneck: on GPUs NCCL's
    dense all-reduce is fast, and the mask would need the token ids on the host.

    Build it before ``wrap_for_training``: it marks the table ``no_sync``, which DataParallel obeys
    both for the gradient all-reduce and for its initial broadcast (so the broadcast is done here).
    Call ``note_ids`` for every micro-batch and ``all_reduce`` after the backward that ends an
    accumulation group, before the gradients are read.
    """

    def __init__(self, weight: paddle.Tensor):
        self.weight = weight
        self.vocab_size = int(weight.shape[0])
        self._used = np.zeros(self.vocab_size, dtype=np.int32)
        weight.no_sync = True
        with paddle.no_grad():
            dist.broadcast(weight, src=0)

    @classmethod
    def for_model(cls, model: paddle.nn.Layer) -> "EmbeddingRowSync | None":
        """The sync for ``model``'s input embedding table, or None where it has none that is a plain Embedding."""
        get_embeddings = getattr(model, "get_input_embeddings", None)
        try:
            embeddings = get_embeddings() if get_embeddings else None
        except NotImplementedError:  # PaddleNLP's default for models that do not say
            embeddings = None
        if not isinstance(embeddings, paddle.nn.Embedding) or embeddings.weight.stop_gradient:
            return None
        return cls(embeddings.weight)

    def note_ids(self, input_ids: paddle.Tensor) -> None:
        self._used[input_ids.numpy().reshape(-1)] = 1

    def all_reduce(self) -> None:
        """Average the used rows of the table's gradient over ranks (collective), as DataParallel averages."""
        rows = np.flatnonzero(all_reduce_max(self._used))
        self._used[:] = 0
        if rows.size == 0:  # every rank agrees on this: the mask was all-reduced
            return
        grad = self.weight.grad
        index = paddle.to_tensor(rows.astype(np.int64))
        with paddle.no_grad():
            # A rank without a gradient still joins the collective, with zeros, so that none waits forever.
            used = (paddle.gather(grad, index) if grad is not None
                    else paddle.zeros([rows.size, *self.weight.shape[1:]], dtype=self.weight.dtype))
            dist.all_reduce(used)
            if grad is not None:
                used.scale_(1.0 / get_world_size())
                grad.scatter_(index, used, overwrite=True)


def embedding_row_sync(model: paddle.nn.Layer, enabled: bool, on_gpu: bool) -> EmbeddingRowSync | None:
    """The row-wise sync of ``model``'s embedding table for CPU workers, or None (one process, GPUs, turned off)."""
    if not (enabled and is_initialized()) or on_gpu:
        return None
    return EmbeddingRowSync.for_model(model)


def no_gradient_sync(wrapped: paddle.nn.Layer):
    """Context in which backward skips the gradient all-reduce (accumulation steps)."""
    if isinstance(wrapped, paddle.DataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def shard_indices(count: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's share of ``range(count)``, strided, with no padding and no repeats.

    Unlike ``DistributedBatchSampler``, which pads so that every rank gets the
    same number of batches, evaluation must see each example exactly once;
    ranks may then run different numbers of batches, which is safe because
    evaluation runs no collective until the final count reduction.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(range(rank, count, world_size))
