"""CPU settings per worker: threads, MKL's path, malloc."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cpu_env import MALLOC_VARIABLE, apply_cpu_thread_settings, cpu_thread_settings

ROOT = str(Path(__file__).resolve().parents[1])


def test_cores_are_shared_between_local_workers():
    alone = cpu_thread_settings({}, cpu_count=8, vendor="GenuineIntel")
    assert alone == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "FLAGS_paddle_num_threads": "8"}
    two = cpu_thread_settings({"PADDLE_LOCAL_SIZE": "2"}, cpu_count=2, vendor="AuthenticAMD", flags=AVX2_ONLY)
    assert two["OMP_NUM_THREADS"] == "1" and two["MKL_DEBUG_CPU_TYPE"] == "5"
    assert cpu_thread_settings({"PADDLE_LOCAL_SIZE": "4"}, cpu_count=2, vendor="")["OMP_NUM_THREADS"] == "1"


# Flags as /proc/cpuinfo lists them: an AVX2-only EPYC (Zen 2) and an AVX-512 one (Zen 4).
AVX2_ONLY = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 avx2 bmi2".split())
AVX512 = AVX2_ONLY | frozenset("avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 "
                               "avx512_vnni".split())


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", AVX512, "7"),  # MKL's AVX-512 path for Xeons, not its Xeon Phi one (6: SIGILL off Phi)
    ("AuthenticAMD", AVX2_ONLY | {"avx512f"}, "5"),  # AVX-512 F alone is not what that path needs
    ("AuthenticAMD", AVX2_ONLY, "5"),  # its AVX2 path
    ("AuthenticAMD", frozenset({"sse2", "avx"}), None),  # no AVX2: MKL's own choice
    ("GenuineIntel", AVX512, None),  # Intel: MKL picks its best path itself
    ("", frozenset(), None),  # no /proc/cpuinfo
])
def test_mkl_path_follows_the_detected_processor(vendor, flags, expected):
    from pipeline.cpu_env import mkl_cpu_type

    assert mkl_cpu_type(vendor, flags) == expected
    settings = cpu_thread_settings({}, cpu_count=2, vendor=vendor, flags=flags)
    assert settings.get("MKL_DEBUG_CPU_TYPE") == expected


def test_the_users_mkl_path_wins_over_the_detected_one(monkeypatch):
    import pipeline.cpu_env as cpu_env

    monkeypatch.setattr(cpu_env, "_cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_env, "cpu_flags", lambda: AVX512)
    detected = {}
    assert apply_cpu_thread_settings(detected)["MKL_DEBUG_CPU_TYPE"] == "7"
    environ = {"MKL_DEBUG_CPU_TYPE": "5"}
    assert "MKL_DEBUG_CPU_TYPE" not in apply_cpu_thread_settings(environ)
    assert environ["MKL_DEBUG_CPU_TYPE"] == "5"


def test_the_xeon_phi_path_is_left_to_the_user_with_a_warning_on_amd(monkeypatch, capsys):
    import pipeline.cpu_env as cpu_env

    monkeypatch.setattr(cpu_env, "_cpu_vendor", lambda: "AuthenticAMD")
    environ = {"MKL_DEBUG_CPU_TYPE": "6"}
    apply_cpu_thread_settings(environ)
    assert environ["MKL_DEBUG_CPU_TYPE"] == "6"
    assert "Illegal instruction" in capsys.readouterr().err
    apply_cpu_thread_settings({})
    assert capsys.readouterr().err == ""


def test_this_machines_flags_are_read():
    from pipeline.cpu_env import cpu_flags, instruction_set

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags only")
    flags = cpu_flags()
    assert "sse2" in flags, sorted(flags)[:20]  # every x86-64 processor has it
    assert instruction_set(flags) in ("avx512", "avx2", "older")
    assert instruction_set(AVX512) == "avx512" and instruction_set(AVX2_ONLY) == "avx2"


VECTOR_MATH_ON_THE_CHOSEN_PATH = """
import ctypes, json, os
from pipeline.cpu_env import apply_cpu_settings
apply_cpu_settings()
import paddle
import paddle.nn.functional as F
x = paddle.rand([64, 300]) + 0.5
x.stop_gradient = False
# MKL's vector math is behind Paddle's float32 division, exp, log, tanh, erf and sqrt on CPU: the Xeon Phi
# path dies on the first of them on AMD. The CRF's log-sum-exp and the encoder's GELU, softmax and layer
# norm, forward and backward, are what training runs.
y = x / (x + 1) + paddle.exp(x) + paddle.log(x) + paddle.tanh(x) + paddle.erf(x) + paddle.sqrt(x)
y = F.gelu(y) + F.softmax(y) + F.layer_norm(y, [300]) + paddle.logsumexp(y, axis=-1, keepdim=True)
(y.sum() + paddle.matmul(x, x.T).mean()).backward()
assert bool(paddle.isfinite(x.grad).all())
library = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")
detect = ctypes.CDLL(library).mkl_serv_cpu_detect if os.path.exists(library) else None
print(json.dumps({"requested": os.environ.get("MKL_DEBUG_CPU_TYPE"), "mkl_path": detect() if detect else None}))
"""


def test_the_path_chosen_for_this_processor_runs_trainings_vector_math_and_is_the_one_mkl_takes():
    """On this machine, whatever it is: the chosen path must not die in MKL's vector math, and MKL must obey it."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", VECTOR_MATH_ON_THE_CHOSEN_PATH], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-1500:]}"
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    if reported["requested"] is not None and reported["mkl_path"] is not None:
        assert reported["mkl_path"] == int(reported["requested"]), reported


def test_users_own_settings_win():
    environ = {"OMP_NUM_THREADS": "7"}
    applied = apply_cpu_thread_settings(environ)
    assert environ["OMP_NUM_THREADS"] == "7" and "OMP_NUM_THREADS" not in applied
    assert environ["FLAGS_paddle_num_threads"] == applied["FLAGS_paddle_num_threads"]


REALLOCATE = """
import json, resource
from pipeline.cpu_env import keep_freed_memory
applied = keep_freed_memory()
import numpy as np
np.ones(64 << 20, dtype=np.uint8)  # a 64 MiB block, touched, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, dtype=np.uint8)  # the same again
print(json.dumps([sorted(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""


def _page_faults_of_second_allocation(malloc_setting: str | None) -> tuple[list, int]:
    env = {k: v for k, v in os.environ.items() if k != MALLOC_VARIABLE}
    env["PYTHONPATH"] = ROOT
    if malloc_setting is not None:
        env[MALLOC_VARIABLE] = malloc_setting
    out = subprocess.run([sys.executable, "-c", REALLOCATE], env=env, capture_output=True, text=True,
                         check=True).stdout
    applied, faults = json.loads(out)
    return applied, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _page_faults_of_second_allocation(None)
    assert applied == ["M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD"]
    untouched, faults_by_default = _page_faults_of_second_allocation("default")
    assert untouched == []
    # By default the freed 64 MiB went back to the kernel and its pages fault in again: 16,384 of 4 KiB,
    # at least 32 where numpy asks for 2 MiB huge pages.
    assert faults_by_default >= 32, faults_by_default
    assert faults <= max(1, faults_by_default // 20), (faults, faults_by_default)


RELEASE = """
import json
from pipeline.cpu_env import keep_freed_memory, release_freed_memory
import numpy as np

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

keep_freed_memory()
blocks = [np.ones(8 << 20, dtype=np.uint8) for _ in range(32)]  # 256 MiB in 8 MiB blocks, touched
del blocks
kept = rss_mib()
released = release_freed_memory()
print(json.dumps([kept, rss_mib(), released]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_kept_after_a_peak_goes_back_to_the_kernel_when_released():
    out = subprocess.run([sys.executable, "-c", RELEASE], env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True, check=True).stdout
    kept, after, released = json.loads(out)
    assert released is True
    assert kept - after > 200, (kept, after)  # the freed 256 MiB was held, then returned


def test_an_unknown_malloc_setting_is_refused_not_ignored():
    from pipeline.cpu_env import keep_freed_memory

    with pytest.raises(ValueError, match="NERPIPE_MALLOC='off'.*'default'"):
        keep_freed_memory({MALLOC_VARIABLE: "off"})


@pytest.mark.parametrize("script", ["train_dist.py", "predict.py"])
def test_the_scripts_refuse_an_unknown_malloc_setting_in_one_line(script, tmp_path):
    arguments = {"train_dist.py": ["--config", "configs/msra_m3e_small_quick.yaml"],
                 "predict.py": ["--checkpoint", str(tmp_path), "--input", "-"]}[script]
    done = subprocess.run([sys.executable, script, *arguments], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, MALLOC_VARIABLE: "off"}, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: NERPIPE_MALLOC='off'"), done.stderr
    assert "Traceback" not in done.stderr
