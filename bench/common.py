"""Helpers shared by the benchmarks: machine line, peak RSS, min/median/max formatting.

Nothing here imports Paddle: benchmark children set the CPU thread variables
(``pipeline.cpu_env``) first and only then import it.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import sys
from importlib import metadata

import psutil

from pipeline.cpu_env import (THREAD_VARIABLES, cpu_flags, cpuinfo_field, instruction_set,  # no Paddle there either
                              usable_cores)


def thread_settings() -> dict:
    """The CPU thread variables this process runs with (as pipeline.cpu_env set them), for the report."""
    return {name: os.environ.get(name) for name in (*THREAD_VARIABLES, "MKL_DEBUG_CPU_TYPE")}


# The flags that decide which GEMM kernels a library can use (AVX2/FMA, AVX-512 and its bf16/VNNI
# extensions, AMX), listed in the report as the kernel read them at run time.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
             "avx512_vnni", "avx512er", "amx_bf16", "amx_int8", "amx_tile")


def isa_flags(flags=None) -> list[str]:
    """Which of ISA_FLAGS this processor reports (in ISA_FLAGS' order)."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in ISA_FLAGS if flag in flags]


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (or the platform's processor string)."""
    return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def package_version(name: str) -> str:
    """Installed version of a distribution, read from its metadata (does not import it)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """CPU, cores, memory and the versions that matter for a training benchmark."""
    memory_gib = psutil.virtual_memory().total / 2**30
    return {
        "cpu": cpu_model(),
        "vendor": cpuinfo_field("vendor_id"),
        # Detected at run time: machines of one kind differ, and MKL's path (pipeline.cpu_env) follows it.
        "instruction_set": instruction_set(cpu_flags()),
        "isa_flags": isa_flags(),
        "cores": usable_cores(),
        "memory_gib": round(memory_gib, 1) if memory_gib else None,
        "python": platform.python_version(),
        "paddle": package_version("paddlepaddle"),
        "paddlenlp": package_version("paddlenlp"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict) -> str:
    """One line naming the machine and the versions, for the head of every report."""
    mem = f", {info['memory_gib']} GiB" if info.get("memory_gib") else ""
    isa = f" ({info['instruction_set']})" if info.get("instruction_set") else ""
    return (f"{info['cpu']}{isa}, {info['cores']} cores{mem}; python {info['python']}, paddlepaddle {info['paddle']}, "
            f"paddlenlp {info['paddlenlp']}")


def now_utc() -> str:
    """The current time in UTC, so reports from different machines compare."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def command_line() -> str:
    """The command as typed (interpreter and script), quoted where needed."""
    import shlex

    return " ".join(shlex.quote(part) for part in [sys.executable, *sys.argv])


def peak_rss_mib(pid: int | None = None) -> float | None:
    """Peak resident set size so far, MiB (VmHWM): of this process (else ru_maxrss), or of process ``pid``
    (None once it is gone)."""
    try:
        with open(f"/proc/{pid or 'self'}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid is not None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def script_processes(root_pid: int, script: str) -> list[int]:
    """Processes under root_pid (itself included) running ``script`` but not the launcher, sorted by pid:
    the workers of a job, whether it runs under paddle.distributed.launch or plainly.

    A process whose parent also runs ``script`` is not a worker: a worker's forked child (a
    subprocess between fork and exec, a multiprocessing helper) carries its parent's command line
    for a moment, and counting it would report a third worker of a two-rank job."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:  # the job has just ended
        return []
    found = {}
    for process in processes:
        try:
            line = " ".join(process.cmdline())
            parent = process.ppid()
        except psutil.Error:  # gone, or no longer ours to read
            continue
        if script in line and "paddle.distributed.launch" not in line:
            found[process.pid] = parent
    return sorted(pid for pid, parent in found.items() if parent not in found)


def summary(values) -> dict | None:
    """min / median / max of a list of numbers (None for an empty list)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def fmt_mmm(stats: dict | None, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    """'median (min..max)' of a summary; '-' when there is none."""
    if not stats:
        return "-"
    med, low, high = (fmt.format(stats[k] * scale) for k in ("median", "min", "max"))
    return f"{med} ({low}..{high})" if stats["n"] > 1 else med


def ratio(a, b) -> float | None:
    """``a / b``, or None when either side is missing or ``b`` is 0 (a part that did not run)."""
    return a / b if a is not None and b else None


def table(rows: list[list[str]], header: list[str]) -> str:
    """Plain-text table with columns padded to their widest cell."""
    cells = [header] + rows
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
