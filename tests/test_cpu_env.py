"""CPU thread settings per worker."""
from __future__ import annotations

from pipeline.cpu_env import apply_cpu_thread_settings, cpu_thread_settings


def test_cores_are_shared_between_local_workers():
    alone = cpu_thread_settings({}, cpu_count=8, vendor="GenuineIntel")
    assert alone == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "FLAGS_paddle_num_threads": "8"}
    two = cpu_thread_settings({"PADDLE_LOCAL_SIZE": "2"}, cpu_count=2, vendor="AuthenticAMD")
    assert two["OMP_NUM_THREADS"] == "1" and two["MKL_DEBUG_CPU_TYPE"] == "5"
    assert cpu_thread_settings({"PADDLE_LOCAL_SIZE": "4"}, cpu_count=2, vendor="")["OMP_NUM_THREADS"] == "1"


def test_users_own_settings_win():
    environ = {"OMP_NUM_THREADS": "7"}
    applied = apply_cpu_thread_settings(environ)
    assert environ["OMP_NUM_THREADS"] == "7" and "OMP_NUM_THREADS" not in applied
    assert environ["FLAGS_paddle_num_threads"] == applied["FLAGS_paddle_num_threads"]
