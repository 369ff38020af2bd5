"""GPU paths, proven on CPU (issue 13): what differs on a GPU build (CUDA compiled in, cards visible,
the launcher's variables, Paddle's own choices) is simulated by monkeypatching exactly that, and the
pipeline's decision is asserted. Nothing here initialises CUDA or NCCL."""
from __future__ import annotations

import os
import subprocess
import sys

import paddle
import pytest

from helpers import ROOT, clean_env, make_trainer, overrides
from pipeline import device as device_module
from pipeline import dist, runtime
from pipeline.config import ConfigError, load_config
from pipeline.cpu_env import THREAD_VARIABLES
from pipeline.device import CPU, GPU, Device, DeviceError, choose_device, prepare_process

LAUNCHED_GPU_WORKER = {"PADDLE_TRAINERS_NUM": "2", "PADDLE_TRAINER_ID": "1", "FLAGS_selected_gpus": "1",
                       "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:6171",
                       "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:6170,127.0.0.1:6171"}


def run(command, env=None, timeout=300):
    return subprocess.run(command, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- 1. device by default


def test_device_auto_takes_the_gpu_on_a_cuda_build_with_a_visible_card():
    alone = choose_device("auto", cuda_build=True, environ={}, device_files=["/dev/nvidia0"])
    assert alone.kind == GPU and not alone.required
    launched = choose_device("auto", cuda_build=True, environ=LAUNCHED_GPU_WORKER, device_files=[])
    assert launched.kind == GPU and "GPU 1 (FLAGS_selected_gpus)" in launched.reason
    assert choose_device("true", cuda_build=True, environ=LAUNCHED_GPU_WORKER).required


@pytest.mark.parametrize("cuda_build, environ, device_files, why", [
    (False, LAUNCHED_GPU_WORKER, ["/dev/nvidia0"], "no CUDA support"),
    (True, {"CUDA_VISIBLE_DEVICES": ""}, ["/dev/nvidia0"], "hides every GPU"),
    (True, {"PADDLE_TRAINERS_NUM": "2", "PADDLE_DISTRI_BACKEND": "gloo"}, ["/dev/nvidia0"], "CPU workers"),
    (True, {}, [], "no GPU device"),
])
def test_device_auto_is_the_cpu_without_a_usable_gpu_and_true_is_an_error(cuda_build, environ, device_files, why):
    chosen = choose_device("auto", cuda_build=cuda_build, environ=environ, device_files=device_files)
    assert chosen.kind == CPU and why in chosen.reason
    with pytest.raises(DeviceError, match=why):
        choose_device("true", cuda_build=cuda_build, environ=environ, device_files=device_files)
    assert choose_device("false", cuda_build=True, environ=LAUNCHED_GPU_WORKER).kind == CPU


def test_device_build_is_read_from_paddles_version_file_without_importing_it():
    assert device_module.paddle_has_cuda() == paddle.is_compiled_with_cuda()
    assert device_module.paddle_has_cuda({"cuda_version": "12.6"})
    assert not device_module.paddle_has_cuda({"cuda_version": "False", "hip_version": "None"})


def test_device_use_gpu_keeps_its_booleans_in_yaml_and_overrides(tmp_path):
    assert load_config().use_gpu == "auto"
    path = tmp_path / "old.yaml"
    path.write_text("use_gpu: true\n", encoding="utf-8")  # as configs and checkpoints wrote it before 'auto'
    assert load_config(str(path)).use_gpu == "true"
    assert load_config(str(path), ["use_gpu=false"]).use_gpu == "false"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        load_config(None, ["use_gpu=false", "amp=fp16"])
    assert load_config(None, ["amp=fp16"]).amp == "fp16"  # auto: checked against the device found


def test_device_true_on_this_cpu_machine_is_one_line_before_any_data_is_read(tmp_path):
    missing = tmp_path / "no_such_dataset"
    for command in ([sys.executable, "train_dist.py", "use_gpu=true", f"dataset={missing}"],
                    [sys.executable, "predict.py", "--checkpoint", str(missing), "--input", str(missing),
                     "--device", "gpu"],
                    [sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(missing), "--file", str(missing),
                     "--use_gpu"]):
        result = run(command)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: a GPU was asked for"), result.stderr
        assert "no CUDA support" in lines[0] and "no_such_dataset" not in lines[0]


def test_device_set_by_paddle_falls_back_for_auto_and_stops_for_true(monkeypatch, caplog):
    """A CUDA build where the probe expected a card but Paddle counts none."""
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceError, match="Paddle sees no GPU"):
        runtime.set_device(Device(GPU, "use_gpu=true: simulated", required=True))
    assert runtime.set_device(Device(GPU, "use_gpu=auto: simulated")).kind == CPU
    assert paddle.get_device() == "cpu" and "running on CPU" in caplog.text


@pytest.mark.slow
def test_device_auto_on_cpu_trains_as_before_and_the_first_log_line_says_so(tiny_model_dir, tiny_dataset_dir,
                                                                            tmp_path):
    result = run([sys.executable, "train_dist.py", *overrides(tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                                                              max_steps=2, do_test=False, use_vdl=False)])
    assert result.returncode == 0, result.stderr[-2000:]
    logged = [line for line in result.stdout.splitlines() if " INFO " in line]
    assert "device: cpu (use_gpu=auto: this Paddle build has no CUDA support" in logged[0]


# ---------------------------------------------------------------- 2. CPU stays CPU


class _StopBeforeTheGroup(Exception):
    pass


def _simulate_launched_cuda_worker(monkeypatch) -> dict:
    """Paddle's init_parallel_env on a CUDA build under the launcher, stopped before any process group."""
    from paddle.distributed import parallel

    chosen = {}
    for name, value in LAUNCHED_GPU_WORKER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PADDLE_DISTRI_BACKEND", "auto")  # Paddle's default; restored (unset) afterwards
    monkeypatch.setattr(parallel.core, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(parallel.core, "CUDAPlace", lambda device_id: f"CUDAPlace({device_id})")
    monkeypatch.setattr(parallel, "_set_expected_place", lambda place: chosen.update(place=str(place)))

    def record_backend(backend):
        chosen["backend"] = backend
        raise _StopBeforeTheGroup

    monkeypatch.setattr(parallel, "_set_default_backend", record_backend)
    return chosen


def test_cpu_stays_cpu_under_the_launcher_on_a_cuda_build_gloo_and_the_cpu_place(monkeypatch):
    chosen = _simulate_launched_cuda_worker(monkeypatch)
    with pytest.raises(_StopBeforeTheGroup):
        dist.init_distributed(on_gpu=False)
    assert chosen == {"place": "Place(cpu)", "backend": "gloo"}


def test_cpu_stays_cpu_simulation_shows_what_paddle_does_on_its_own_for_a_gpu_worker(monkeypatch):
    """The same simulation without our forcing: NCCL and the worker's card, as parallel.py does."""
    chosen = _simulate_launched_cuda_worker(monkeypatch)
    with pytest.raises(_StopBeforeTheGroup):
        dist.init_distributed(on_gpu=True)
    assert chosen == {"place": "CUDAPlace(1)", "backend": "nccl"}


def test_cpu_stays_cpu_thread_and_malloc_settings_follow_the_device_found(monkeypatch):
    monkeypatch.setattr(device_module, "paddle_has_cuda", lambda fields=None: True)
    on_gpu_worker = dict(LAUNCHED_GPU_WORKER)
    assert prepare_process("auto", on_gpu_worker).kind == GPU
    assert not set(THREAD_VARIABLES) & set(on_gpu_worker)
    for use_gpu in ("false", "auto"):
        cpu_worker = {"PADDLE_TRAINERS_NUM": "2", "PADDLE_LOCAL_SIZE": "2", "PADDLE_DISTRI_BACKEND": "gloo"}
        assert prepare_process(use_gpu, cpu_worker).kind == CPU
        assert set(THREAD_VARIABLES) <= set(cpu_worker)


@pytest.mark.parametrize("simulated_gpu", [False, True])
def test_cpu_stays_cpu_matmul_bias_grad_follows_the_device_in_use(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                                 monkeypatch, simulated_gpu):
    import pipeline.trainer as trainer_module

    installed = []
    monkeypatch.setattr(trainer_module, "on_gpu", lambda: simulated_gpu)
    monkeypatch.setattr(trainer_module, "install_matmul_bias_grad", installed.append)
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path, to_static=False, use_gpu="auto")
    trainer._prepare()
    assert len(installed) == (0 if simulated_gpu else 1)


# ---------------------------------------------------------------- 6. bf16 where it exists


def test_bf16_on_a_gpu_without_it_stops_at_start(monkeypatch):
    monkeypatch.setattr(runtime, "current_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda device=None: False)
    with pytest.raises(DeviceError, match="gpu:0 has no bfloat16 support"):
        runtime.check_amp_on_device("bf16")
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda device=None: True)
    runtime.check_amp_on_device("bf16")
    monkeypatch.setattr(paddle.amp, "is_float16_supported", lambda device=None: False)
    with pytest.raises(DeviceError, match="no float16 support"):
        runtime.check_amp_on_device("fp16")


def test_bf16_stays_allowed_on_cpu_and_fp16_is_refused_there():
    assert not runtime.on_gpu()
    runtime.check_amp_on_device("bf16")
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        runtime.check_amp_on_device("fp16")


# ---------------------------------------------------------------- 9. determinism


def test_deterministic_sets_paddles_flags_on_a_gpu_build(monkeypatch):
    assert load_config().deterministic is False
    set_flags = {}
    gpu_build_flags = {"FLAGS_cudnn_deterministic": False, "FLAGS_embedding_deterministic": 0, "FLAGS_other": 1}
    monkeypatch.setattr(paddle.base.core, "globals", lambda: gpu_build_flags)
    monkeypatch.setattr(paddle, "set_flags", set_flags.update)
    assert runtime.set_deterministic() == {"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1}
    assert set_flags == {"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1}


def test_deterministic_on_a_cpu_build_sets_nothing_and_does_not_fail():
    assert runtime.set_deterministic() == {}


# ---------------------------------------------------------------- 11. GPU inference


class _RecordingInferenceConfig:
    def __init__(self, *files):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


def test_gpu_static_engine_runs_on_the_process_card_in_the_precision_asked(monkeypatch):
    from paddle import inference

    from pipeline import engines

    monkeypatch.setattr(engines.inference, "Config", _RecordingInferenceConfig)
    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:1")  # the card paddle.set_device('gpu') chose
    for precision, mode in (("fp32", inference.PrecisionType.Float32), ("fp16", inference.PrecisionType.Half)):
        config = engines.paddle_inference_config("model.json", "model.pdiparams", use_gpu=True, threads=1,
                                                 onednn=False, ir_optim=True, memory_optim=False, precision=precision)
        assert ("enable_use_gpu", (engines.GPU_MEMORY_POOL_MB, 1, mode)) in config.calls


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--precision", "fp16", "--engine", "static"], "not available on CPU (there: fp32, int8)"),
    (["--device", "gpu", "--precision", "fp16", "--engine", "dynamic"], "add --engine static"),
    (["--device", "cpu", "--use_gpu"], "--use_gpu contradicts --device cpu"),
    (["--device", "gpu", "--workers", "2"], "--workers is for CPU prediction"),
])
def test_gpu_precision_and_device_flags_are_checked_per_device(argv, message, capsys):
    import predict

    with pytest.raises(SystemExit) as stopped:
        predict.parse_args(["--checkpoint", "c", "--input", "i", *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_gpu_precision_choices_are_validated_by_the_engine_too():
    from pipeline.engines import StaticEngine

    with pytest.raises(ValueError, match="not available on CPU"):
        StaticEngine("no_such_export", use_gpu=False, precision="fp16")


# ---------------------------------------------------------------- 12. the GPU check, and launch/ without GPUs


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check"
    result = run(["bash", "scripts/gpu_check.sh"], env={**clean_env(), "OUT": str(out), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("gpu_check: no GPU found: this Paddle build has no CUDA support "
                                     "(paddlepaddle, not paddlepaddle-gpu): nothing to check, nothing run")
    assert not out.exists()


@pytest.mark.parametrize("script, variables", [
    ("launch/local.sh", {"GPUS": "0,1"}),
    ("launch/multinode.sh", {"GPUS": "0,1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "NNODES": "1"}),
    ("launch/multinode.sh", {"GPUS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "NNODES": "1"}),
])
def test_gpu_launch_scripts_say_no_gpu_was_found_instead_of_the_launchers_traceback(script, variables, tmp_path):
    env = {**clean_env(), **variables, "CONFIG": "configs/msra_m3e_small_quick.yaml", "PYTHON": sys.executable,
           "LOG_DIR": str(tmp_path / "log")}
    result = run(["bash", script], env=env)
    assert result.returncode == 2
    assert "no GPU found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "log").exists()  # the launcher never started
