"""Batch prediction in several processes: a pool of CPU workers, or the ranks of the launcher.

On CPU, Paddle runs matrix products on all the threads it is given but most
other kernels (layer norm, softmax, GELU, additions) on one, and the matrices of
a batch of short sentences are small: one process with every core leaves cores
idle for much of a batch. N processes with cores/N threads each keep them busy
(measured in BENCHMARKS.md). Each worker loads the predictor once, in its own
process, from the same checkpoint; texts are split into contiguous shards of
about equal length and the results come back in input order.

``RankPredictor`` is the other way to use several processes (or GPUs, or nodes): the ranks of
``paddle.distributed.launch``, each a whole process with its share of the cores or its own card.

This module must not import Paddle at the top: a worker sets its thread
variables first (pipeline.cpu_env), then imports it.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .cpu_env import THREAD_VARIABLES, apply_cpu_settings, usable_cores

_predictor = None  # one per worker process, loaded by the first task
_start_barrier = None  # shared by the workers of one pool: see ParallelPredictor.start


def _set_worker_threads(threads: int, barrier) -> None:
    """Pool initializer: this worker's thread count, before anything imports Paddle."""
    global _start_barrier
    _start_barrier = barrier
    # Ctrl-C and Slurm's warning reach the whole process group: the parent then finishes the chunk in flight
    # and stops (predict.py's graceful stop), which needs its workers. SIGTERM still ends a worker at once.
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    apply_cpu_settings()  # the rest (MKL's fast path on AMD, malloc) as in a single process


def _predict_shard(predictor_options: dict, texts: list[str]) -> tuple[str, list[dict]]:
    """Load the predictor on first use (errors reach the caller as exceptions), then predict."""
    global _predictor
    if _predictor is None:
        import paddle

        # Paddle's C++ handler for SIGTERM prints a stack trace, which allocates: arriving in the middle
        # of a malloc (a worker allocates all the time) it can deadlock, and the executor, which
        # SIGTERMs the survivors once one worker has died, then waits for them forever. A worker has no
        # state worth a trace: let SIGTERM end it at once.
        paddle.disable_signal_handler()
        from .predictor import Predictor

        _predictor = Predictor.from_checkpoint(**predictor_options)
    return _predictor.engine_name, _predictor.predict(texts)


def _load(predictor_options: dict) -> str:
    _start_barrier.wait()  # hold this worker until every worker has a task: one load task each
    return _predict_shard(predictor_options, [])[0]


def _usage(_) -> dict:
    """This worker's CPU seconds and peak RSS so far (one call per worker: see ParallelPredictor.usage)."""
    import resource

    _start_barrier.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"pid": os.getpid(), "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux reports KiB


class WorkerDied(RuntimeError):
    """A prediction worker process ended while it had work (killed, e.g. by the out-of-memory killer)."""


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def shard_bounds(lengths: list[int], shards: int) -> list[tuple[int, int]]:
    """Split ``range(len(lengths))`` into at most ``shards`` contiguous, non-empty runs of about equal total length."""
    total, bounds, begin, running = sum(lengths) or 1, [], 0, 0
    for index, length in enumerate(lengths):
        running += length
        # Close a shard once its running total reaches the next equal share, keeping order intact.
        if len(bounds) < shards - 1 and running * shards >= total * (len(bounds) + 1) and index + 1 < len(lengths):
            bounds.append((begin, index + 1))
            begin = index + 1
    if begin < len(lengths):
        bounds.append((begin, len(lengths)))
    return bounds


class ParallelPredictor:
    """``Predictor.predict`` spread over ``workers`` processes; same results, same order.

    ``predictor_options`` are ``Predictor.from_checkpoint``'s arguments (checkpoint
    ``directory``, ``batch_size``, ``engine``...). Use as a context manager or call
    ``close()``: the worker processes live until then.
    """

    def __init__(self, workers: int, threads: int | None = None, **predictor_options):
        if workers < 2:
            raise ValueError(f"ParallelPredictor needs at least 2 workers, got {workers}; use Predictor")
        self.workers = workers
        self.threads = threads or max(1, usable_cores() // workers)
        self.predictor_options = predictor_options
        self.engine_name = None  # known after the first predict()
        # spawn, not fork: the parent may already hold Paddle with its own threads. An executor, not
        # multiprocessing.Pool: a Pool silently replaces a worker that dies (e.g. killed for memory) and
        # waits forever for its task; the executor fails every pending task at once (BrokenProcessPool).
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_set_worker_threads,
                                         initargs=(self.threads, context.Barrier(workers)))
        self._processes = {}  # pid -> Process, kept to say which worker died and how

    def _run(self, function, *iterables) -> list:
        """``function`` over the arguments in the workers, in order; a dead worker raises WorkerDied, naming it."""
        try:
            futures = [self._pool.submit(function, *arguments) for arguments in zip(*iterables)]
            # The executor's own process table (private, but the only record of each exit code);
            # taken while the workers live, because a broken executor forgets its processes.
            self._processes.update(getattr(self._pool, "_processes", None) or {})
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                if any(future.exception() for future in done):  # the earlier ones all succeeded
                    break
                # Python 3.11's executor watches only the workers it knew when it last woke up: one it
                # spawned on the last submit can die unnoticed while the others are busy. Workers never
                # exit while tasks are pending, so an ended one is a death, whoever noticed it.
                if pending and any(process.exitcode is not None for process in self._processes.values()):
                    raise WorkerDied(self._death_report())
            return [future.result() for future in futures]
        except BrokenProcessPool:
            raise WorkerDied(self._death_report()) from None

    def _death_report(self) -> str:
        # When the executor noticed the death it has SIGTERMed the survivors: the others are the cause.
        # A worker still running 5 s on (it outlived that SIGTERM, or the death was noticed by _run, not
        # the executor) is killed and never named: the executor's thread joins every worker, and
        # close() and the interpreter's exit join that thread, so one survivor would hang the run.
        for process in self._processes.values():
            process.join(timeout=5)
        ended = {pid: process.exitcode for pid, process in self._processes.items()}
        for process in self._processes.values():
            if process.exitcode is None:
                process.kill()
                process.join(timeout=5)
        culprits = {pid: code for pid, code in ended.items() if code not in (-signal.SIGTERM, None)} or ended
        named = ", ".join(f"pid {pid} ({_how_it_ended(code)})" for pid, code in sorted(culprits.items()))
        return (f"a prediction worker process died while predicting: {named or 'unknown pid'}; "
                f"out of memory? Try fewer --workers or a smaller --batch_size")

    def start(self) -> None:
        """Load the model in every worker now (else on first use); loading errors are raised here."""
        names = self._run(_load, [self.predictor_options] * self.workers)
        self.engine_name = names[0]

    def usage(self) -> list[dict]:
        """Every worker's CPU seconds and peak RSS so far, one dict per worker."""
        return self._run(_usage, range(self.workers))

    def predict(self, texts: list[str]) -> list[dict]:
        bounds = shard_bounds([len(text) for text in texts], self.workers)
        if not bounds:
            return []
        answers = self._run(_predict_shard, [self.predictor_options] * len(bounds),
                            [texts[b:e] for b, e in bounds])
        self.engine_name = answers[0][0]
        return [result for _, results in answers for result in results]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if exc_info[0] is None:
            self.close()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


class RankPredictor:
    """``Predictor.predict`` spread over the ranks of ``paddle.distributed.launch``; same results, same order.

    Rank 0 alone reads the input and writes the output (other nodes need neither file): its
    ``predict`` splits each chunk into one contiguous shard per rank, of about equal length
    (``shard_bounds``), sends each rank its shard, predicts its own and gathers the others' results.
    Every other rank runs ``serve`` until rank 0's ``close``. Lines go to ranks afresh in every
    chunk, so an output left unfinished by a run of one world size is continued by any other.
    """

    # What rank 0's close sends instead of a shard: None when the input is done, this when the run stopped on
    # a stop signal (every rank then exits with the relaunch code).
    STOP = "stop"

    def __init__(self, predictor, stop_requested=lambda: False):
        from . import dist  # imports Paddle: only once the process's device and threads are set

        self._dist = dist
        self.predictor = predictor
        self.world_size = dist.get_world_size()
        # This rank's own stop signal; each chunk's gather carries every rank's, so that a signal that reached
        # one node only (a pod evicted) stops all of them after the same chunk.
        self.stop_requested = stop_requested
        self.stop_seen = False  # rank 0: some rank asked to stop during the last chunk

    @property
    def engine_name(self) -> str:
        return self.predictor.engine_name

    def predict(self, texts: list[str]) -> list[dict]:
        """Rank 0: every rank's share of ``texts`` predicted, in order (collective with ``serve``)."""
        shards = [texts[begin:end] for begin, end in shard_bounds([len(text) for text in texts], self.world_size)]
        shards += [[] for _ in range(self.world_size - len(shards))]  # fewer texts than ranks
        mine = self._dist.scatter_objects(shards)
        gathered = self._dist.all_gather_objects((self.predictor.predict(mine), self.stop_requested()))
        self.stop_seen = any(stop for _, stop in gathered)
        return [result for results, _ in gathered for result in results]

    def serve(self) -> bool:
        """Every rank but 0: predict the shards rank 0 sends until it sends None or STOP (``close``); whether
        it was STOP."""
        while (shard := self._dist.scatter_objects(None)) not in (None, self.STOP):
            self._dist.all_gather_objects((self.predictor.predict(shard), self.stop_requested()))
        return shard == self.STOP

    def close(self, stopped: bool = False) -> None:
        """Rank 0: release the ranks waiting in ``serve``; ``stopped``: the run stopped on a signal."""
        self._dist.scatter_objects([self.STOP if stopped else None] * self.world_size)
