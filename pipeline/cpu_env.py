"""CPU settings that must be in place before Paddle is imported: threads, MKL's path, malloc.

Paddle's CPU build uses Intel MKL, which on AMD processors takes a generic, slow code path
unless ``MKL_DEBUG_CPU_TYPE`` names one; the fastest one depends on the instruction set the
processor has (detected at run time: machines of one kind differ), and on Intel MKL chooses well
itself. MKL also runs one thread per process unless told otherwise, so each local worker gets its
share of the cores: two workers under ``paddle.distributed.launch`` must not fight over them.

glibc's malloc returns every freed block above its (adaptive, few-MiB)
mmap threshold to the kernel, so each training step page-faults its large
temporaries in anew; ``keep_freed_memory`` keeps them (see the function).

This module must not import Paddle: it exists to run before Paddle does.
"""
from __future__ import annotations

import ctypes
import os
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FLAGS_paddle_num_threads")
MALLOC_VARIABLE = "NERPIPE_MALLOC"  # "default": leave glibc's malloc as it is
MALLOC_KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB freed at its top stays
_MALLOPT_PARAMETERS = {"M_MMAP_THRESHOLD": -3, "M_TRIM_THRESHOLD": -1}  # from <malloc.h>


def cpuinfo_field(name: str) -> str:
    """The first ``name`` field of /proc/cpuinfo ('vendor_id', 'model name'...), or '' where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_vendor() -> str:
    return cpuinfo_field("vendor_id")


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports for this processor (empty where there is no /proc/cpuinfo).

    Read from /proc/cpuinfo by hand: psutil, which the project uses for processes, does not report
    CPU flags.
    """
    return frozenset(cpuinfo_field("flags").split())


# The values of MKL_DEBUG_CPU_TYPE that matter here, in the MKL Paddle's CPU build ships (2019.0.5;
# MKL leaves AMD processors on a generic path unless the variable names one):
#   5  its AVX2 path.
#   7  its AVX-512 path for Skylake-SP and later Xeons (AVX-512 F/CD/BW/DQ/VL only). It is the path
#      MKL picks itself on such an Intel processor: with mkl_serv_intel_cpu() made to answer "Intel"
#      (an LD_PRELOAD probe), mkl_serv_cpu_detect() returns 7 on an AMD EPYC with AVX-512. On a Zen 5
#      EPYC it made a training step 1.4-1.5x faster than 5 (BENCHMARKS.md, 2026-12-07, night).
#   6  its Xeon Phi path: its GEMM runs, but its vector math uses AVX-512ER, which no other processor
#      has, so every float32 division dies with SIGILL (seen: vrcp28ps in mkl_vml_kernel_sDiv).
MKL_AVX2_PATH = "5"
MKL_AVX512_PATH = "7"
MKL_XEON_PHI_PATH = "6"
AVX512_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
AVX2_FLAGS = ("avx2", "fma")


def mkl_cpu_type(vendor: str, flags) -> str | None:
    """MKL's code path for this processor, or None to leave MKL's own choice.

    On Intel, MKL already picks its best path. On AMD it would take a generic one: the AVX-512 path
    where the processor has every AVX-512 subset that path uses, else the AVX2 path where it has AVX2
    and FMA; nothing forced on older processors.
    """
    if vendor != "AuthenticAMD":
        return None
    if all(flag in flags for flag in AVX512_FLAGS):
        return MKL_AVX512_PATH
    if all(flag in flags for flag in AVX2_FLAGS):
        return MKL_AVX2_PATH
    return None


def instruction_set(flags) -> str:
    """The widest vector instruction set among those MKL has a path for: 'avx512', 'avx2' or 'older'."""
    if all(flag in flags for flag in AVX512_FLAGS):
        return "avx512"
    return "avx2" if all(flag in flags for flag in AVX2_FLAGS) else "older"


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, not the machine's count (a scheduler may give us fewer)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_worker_count(environ=os.environ) -> int:
    """Processes on this node, as Paddle's launcher announces it (1 outside the launcher)."""
    return max(1, int(environ.get("PADDLE_LOCAL_SIZE") or environ.get("PADDLE_TRAINERS_NUM") or 1))


def cpu_thread_settings(environ=os.environ, cpu_count: int | None = None, vendor: str | None = None,
                        flags=None) -> dict:
    """Variables to set: this worker's share of cores, plus MKL's fastest path on AMD (``mkl_cpu_type``)."""
    if cpu_count is None:
        cpu_count = usable_cores()
    threads = max(1, cpu_count // local_worker_count(environ))
    settings = {name: str(threads) for name in THREAD_VARIABLES}
    path = mkl_cpu_type(vendor if vendor is not None else _cpu_vendor(), cpu_flags() if flags is None else flags)
    if path is not None:
        settings["MKL_DEBUG_CPU_TYPE"] = path
    return settings


def apply_cpu_thread_settings(environ=os.environ) -> dict:
    """Set the thread variables the user has not set; return what was applied."""
    if environ.get("MKL_DEBUG_CPU_TYPE", "").strip() == MKL_XEON_PHI_PATH and _cpu_vendor() == "AuthenticAMD":
        # The user's setting wins, but it is known to crash later, so say so before any work starts.
        print(f"warning: MKL_DEBUG_CPU_TYPE={MKL_XEON_PHI_PATH} selects MKL's Xeon Phi path, whose vector math "
              f"uses instructions only Xeon Phi had: on this AMD processor the first float32 division may die "
              f"with 'Illegal instruction'. Unset it to get the fastest safe path for this processor "
              f"({MKL_AVX512_PATH} with AVX-512, {MKL_AVX2_PATH} with AVX2).", file=sys.stderr)
    applied = {}
    for name, value in cpu_thread_settings(environ).items():
        if name not in environ:  # the user's own setting always wins
            environ[name] = value
            applied[name] = value
    return applied


def _glibc_function(name: str, *argtypes):
    """glibc's ``int name(argtypes...)`` from this process, or None where there is none (macOS, musl...)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def keep_freed_memory(environ=os.environ) -> dict:
    """Make glibc's malloc keep freed blocks of up to 1 GiB for reuse; return the mallopt values set.

    Paddle's CPU kernels allocate multi-MiB temporaries (exact GELU's backward, the dense embedding
    gradient, ...) outside its own allocator. glibc serves blocks above its mmap threshold with a fresh
    mmap and unmaps them on free, so every step page-faults those pages in anew, which costs more than
    some of the kernels themselves (bench/step_profile.py; figures in BENCHMARKS.md). Peak memory is
    what the step needs anyway; freed memory is kept instead of returned. Not glibc (macOS, musl):
    nothing to set. ``NERPIPE_MALLOC=default`` turns it off.
    """
    setting = environ.get(MALLOC_VARIABLE, "").strip().lower()
    if setting not in ("", "default"):
        # A typo such as NERPIPE_MALLOC=off must not silently leave the setting on.
        raise ValueError(f"{MALLOC_VARIABLE}={environ[MALLOC_VARIABLE]!r}: the only value it takes is 'default' "
                         f"(leave glibc's malloc as it is); unset it to keep freed memory for reuse")
    mallopt = _glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None or setting == "default":
        return {}
    return {name: str(MALLOC_KEEP_BYTES) for name, parameter in _MALLOPT_PARAMETERS.items()
            if mallopt(parameter, MALLOC_KEEP_BYTES) == 1}


def release_freed_memory() -> bool:
    """Hand the free memory malloc keeps back to the kernel (glibc's malloc_trim); True if anything went back.

    For after the occasional work that allocates more than a training step (evaluation, saving):
    without it, the memory ``keep_freed_memory`` keeps would hold each such peak for the rest of the
    run, and a long run's memory would grow in steps at every evaluation (bench/memory_trend.py).
    """
    malloc_trim = _glibc_function("malloc_trim", ctypes.c_size_t)
    return malloc_trim is not None and malloc_trim(0) == 1


def apply_cpu_settings(environ=os.environ) -> dict:
    """Thread variables (where the user has not set them) and malloc's settings; return what was applied."""
    return {**apply_cpu_thread_settings(environ), **keep_freed_memory(environ)}
