"""GPU paths, proven on CPU (issue 13): what differs on a GPU build (CUDA compiled in, cards visible,
the launcher's variables, Paddle's own choices) is simulated by monkeypatching exactly that, and the
pipeline's decision is asserted. Nothing here initialises CUDA or NCCL."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
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
def test_cpu_stays_cpu_matmul_bias_grad_dropout_masks_layer_norm_and_shared_memory_follow_the_device(
        tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch, simulated_gpu):
    import pipeline.trainer as trainer_module

    installed, dropout_masks, layer_norms, restored = [], [], [], []
    monkeypatch.setattr(trainer_module, "on_gpu", lambda: simulated_gpu)
    monkeypatch.setattr(trainer_module, "install_matmul_bias_grad", installed.append)
    # On a GPU Paddle's dropout kernel is fast: the integer-drawn masks are a CPU measure.
    monkeypatch.setattr(trainer_module, "install_dropout_masks_from_integers", dropout_masks.append)
    monkeypatch.setattr(trainer_module, "uninstall_from_attention", lambda: restored.append(True))
    # Our C++ layer norm is a CPU kernel: on a GPU the model keeps Paddle's.
    monkeypatch.setattr(trainer_module, "install_native_layer_norm", layer_norms.append)
    # GPU workers keep DataParallel (NCCL): the shared-memory all-reduce is told it is not CPU float32.
    shared_memory = []
    monkeypatch.setattr(trainer_module, "shared_memory_gradient_sync",
                        lambda model, enabled, cpu_float32: shared_memory.append((enabled, cpu_float32)))
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path, to_static=False, use_gpu="auto")
    trainer._prepare()
    assert len(installed) == len(dropout_masks) == len(layer_norms) == (0 if simulated_gpu else 1)
    assert shared_memory == [(True, not simulated_gpu)]
    assert restored == ([True] if simulated_gpu else [])


def test_only_cpu_workers_all_reduce_the_embedding_table_by_its_used_rows(monkeypatch):
    # On GPUs NCCL all-reduces the dense table fast, and the rows would need the token ids on the host.
    from pipeline import dist

    built = []
    monkeypatch.setattr(dist.EmbeddingRowSync, "for_model", classmethod(lambda cls, model: built.append(model) or cls))
    assert dist.embedding_row_sync("model", enabled=True, on_gpu=False) is None  # one process: nothing to sync
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as under the launcher
    assert dist.embedding_row_sync("model", enabled=True, on_gpu=True) is None
    assert dist.embedding_row_sync("model", enabled=False, on_gpu=False) is None
    assert dist.embedding_row_sync("model", enabled=True, on_gpu=False) is dist.EmbeddingRowSync
    assert built == ["model"]


# ---------------------------------------------------------------- 3. O2 does not crash at the end


def simulate_o2_training(monkeypatch, calls: list):
    """A run under O2 as on a GPU, on CPU: ``paddle.amp.decorate`` casts the parameters as it does past its GPU
    check (``decorate_as_on_a_gpu``), so they are float16/bfloat16 whenever the trainer saves, evaluates or
    loads weights. CPU has no low-precision kernels for BERT's ops ("kernel add is not registered for
    bfloat16"), so each training step alone runs with the parameters cast to float32, and they are cast back
    with decorate's own cast after it. Not simulated: the low-precision arithmetic and the master weights."""
    from paddle.amp.auto_cast import amp_initialize

    import pipeline.trainer as trainer_module

    monkeypatch.setattr(paddle.amp, "decorate", decorate_as_on_a_gpu(calls))
    forward_backward, optimizer_step = trainer_module.Trainer._forward_backward, trainer_module.Trainer._optimizer_step

    def in_float32(self, *args):
        self.model.float()
        return forward_backward(self, *args)

    def cast_back_after(self, *args):
        applied = optimizer_step(self, *args)
        amp_initialize(models=[self.model], dtype=self.amp.dtype,
                       excluded_layers=self.amp.float32_layers(self.model))
        return applied

    monkeypatch.setattr(trainer_module.Trainer, "_forward_backward", in_float32)
    monkeypatch.setattr(trainer_module.Trainer, "_optimizer_step", cast_back_after)


@pytest.mark.parametrize("amp, low", [("bf16", paddle.bfloat16), ("fp16", paddle.float16)])
def test_o2_runs_to_the_end_saves_float32_and_predict_loads_it(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                               monkeypatch, amp, low):
    import predict
    from pipeline.readers import read_examples

    calls = []
    simulate_o2_training(monkeypatch, calls)
    out = tmp_path / "run"
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, amp=amp, amp_level="O2", to_static=False,
                           max_steps=4, eval_interval=2, save_interval=2, do_test=True)
    result = trainer.fit()  # ends by loading best_model's float32 weights into the O2 model, then tests it
    assert [call["level"] for call in calls] == ["O2"] and result.global_step == 4 and result.test is not None
    assert {p.dtype for p in trainer.model.parameters()} >= {low}  # still the decorated model after the reload
    for weights in (out / "best_model" / "model.pdparams", out / "checkpoints" / "step-00000004" / "model.pdparams"):
        assert {tensor.dtype for tensor in paddle.load(str(weights)).values()} == {paddle.float32}, weights
    examples, _ = read_examples(tiny_dataset_dir / "test.tsv")
    texts, predicted = tmp_path / "test.txt", tmp_path / "test.jsonl"
    texts.write_text("".join("".join(e.tokens) + "\n" for e in examples), encoding="utf-8")
    assert predict.main(["--checkpoint", str(out / "best_model"), "--input", str(texts),
                         "--output", str(predicted)]) == 0
    labels = [json.loads(line)["labels"] for line in predicted.read_text(encoding="utf-8").splitlines()]
    assert labels == [json.loads(line)["predicted"] for line in (out / "test_predictions.jsonl").open()]


# ---------------------------------------------------------------- 4. resume across device counts


def _generator_states(*seeds):
    """Real generator states that tell apart by their seed (``current_seed``)."""
    states = []
    for seed in seeds:
        paddle.seed(seed)
        states.append(paddle.get_rng_state()[0])
    return states


def test_resume_across_device_counts_saves_this_workers_own_card_and_resumes_on_cpu(
        tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch, caplog):
    import pipeline.trainer as trainer_module
    from pipeline.checkpoint import RNG_FILE

    out = tmp_path / "run"
    card_0, card_1 = _generator_states(100, 101)
    # A worker given GPU 1 of two visible cards: Paddle returns one state per visible GPU.
    with monkeypatch.context() as simulated:
        simulated.setattr(paddle, "get_rng_state", lambda device=None: [card_0, card_1])
        simulated.setattr(trainer_module, "current_device", lambda: "gpu:1")
        make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, save_interval=2, eval_interval=0,
                     do_test=False, to_static=False).fit()
    saved = paddle.load(str(out / "checkpoints" / "step-00000002" / RNG_FILE))["own_per_rank"]
    assert [(s["device"], s["state"].current_seed()) for s in saved] == [("gpu", 101)]
    # Resumed on this CPU: a warning, then the remaining steps.
    with caplog.at_level("WARNING"):
        result = make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=4, save_interval=2, eval_interval=0,
                              do_test=False, to_static=False).fit()
    assert result.global_step == 4
    assert "was written on GPU and is resumed on CPU" in caplog.text


def test_resume_across_device_counts_restores_only_this_workers_card(monkeypatch, caplog):
    from pipeline.checkpoint import own_rng_state, restore_own_rng_state

    saved_card, *visible = _generator_states(7, 20, 21, 22)
    set_to = []
    monkeypatch.setattr(paddle, "get_rng_state", lambda device=None: list(visible))
    monkeypatch.setattr(paddle, "set_rng_state", lambda states, device=None: set_to.append(states))
    # Written on one GPU, resumed as the worker on GPU 2 of three: set_rng_state gets three states.
    restore_own_rng_state({"device": "gpu", "state": saved_card}, "gpu:2", "state")
    assert [s.current_seed() for s in set_to[0]] == [20, 21, 7]
    assert own_rng_state("gpu:1")["state"].current_seed() == 21
    # Written on CPU, resumed on a GPU: a warning, the generators untouched.
    with caplog.at_level("WARNING"):
        restore_own_rng_state({"device": "cpu", "state": saved_card}, "gpu:0", "state")
    assert len(set_to) == 1 and "written on CPU and is resumed on GPU" in caplog.text


# ---------------------------------------------------------------- 5. fp16 overflows are not NaN failures


class GradScalerAsOnAGpu:
    """``paddle.amp.GradScaler`` as it behaves on a GPU (on CPU Paddle disables it: "AmpScaler can only be
    enabled on CUDAPlace"), with the gradients of the first ``overflows`` steps overflowing its scale, or
    of every step (``overflows=None``). As in ``amp/grad_scaler.py``: ``unscale_`` divides the gradients by
    the scale and sets found_inf; ``step`` skips the update when it is set and keeps the verdict in
    ``_cache_found_inf`` (a Python bool, as Paddle's optimiser leaves it); ``update`` halves the scale after
    an overflow (decr_every_n_nan_or_inf=1). ``scales`` records the scale of every step."""

    def __init__(self, overflows, init_loss_scaling):
        self.overflows, self.scale_value, self.steps, self.scales = overflows, init_loss_scaling, 0, []
        self._cache_found_inf = None

    def is_enable(self):
        return True

    def scale(self, loss):
        return loss * self.scale_value

    @paddle.no_grad()
    def unscale_(self, optimizer):
        self.found_inf = self.overflows is None or self.steps < self.overflows
        for parameter in optimizer._parameter_list:
            if parameter.grad is not None:
                parameter.grad.scale_(1 / self.scale_value)
        if self.found_inf:  # what an fp16 overflow leaves in a gradient
            next(p for p in optimizer._parameter_list if p.grad is not None).grad.fill_(float("inf"))

    def step(self, optimizer):
        self._cache_found_inf = self.found_inf
        if not self.found_inf:
            optimizer.step()

    def update(self):
        self.scales.append(self.scale_value)
        self.steps += 1
        if self._cache_found_inf:
            self.scale_value /= 2

    def state_dict(self):
        return {"scale": np.array([self.scale_value], dtype=np.float32)}

    def load_state_dict(self, state):
        self.scale_value = float(state["scale"][0])


def test_fp16_overflows_early_in_a_run_are_counted_apart_and_never_stop_it(tiny_model_dir, tiny_dataset_dir,
                                                                           tmp_path, monkeypatch, caplog):
    scalers = []
    monkeypatch.setattr(paddle.amp, "GradScaler", lambda init_loss_scaling: scalers.append(
        GradScalerAsOnAGpu(overflows=6, init_loss_scaling=init_loss_scaling)) or scalers[-1])
    out = tmp_path / "run"
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, amp="fp16", max_steps=8, max_bad_steps=2,
                           log_interval=4, eval_interval=0, do_test=False, to_static=False)
    with caplog.at_level("INFO"):
        result = trainer.fit()  # 6 overflows in a row, max_bad_steps=2: no NumericalError
    assert result.global_step == 8 and result.loss_scale_overflows == 6 and result.bad_steps == 0
    assert scalers[0].scales == [32768.0 / 2 ** min(i, 6) for i in range(8)]
    logged = [json.loads(line) for line in (out / "train_metrics.jsonl").open()]
    assert [(r["step"], r["loss_scale_overflows"]) for r in logged] == [(4, 4), (8, 2)]
    assert logged[0]["grad_norm"] is None and logged[1]["grad_norm"] > 0  # steps 7 and 8 were applied
    assert "4 step(s) skipped by the fp16 loss scaler" in caplog.text and "NaN/Inf" not in caplog.text


def test_fp16_overflows_the_scaler_cannot_explain_are_bad_steps(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                                monkeypatch):
    from pipeline.trainer import NumericalError

    monkeypatch.setattr(paddle.amp, "GradScaler",
                        lambda init_loss_scaling: GradScalerAsOnAGpu(None, init_loss_scaling))
    # From a scale of 4, steps 1-2 overflow at 4 and 2; at 1 (the floor) the gradients overflow unscaled.
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", amp="fp16", init_loss_scaling=4.0,
                           max_steps=8, max_bad_steps=3, eval_interval=0, do_test=False, to_static=False)
    with pytest.raises(NumericalError, match="stopping at step 5: 3 steps in a row"):
        trainer.fit()
    assert (trainer.progress.loss_scale_overflows, trainer.progress.bad_steps) == (2, 3)


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


# ---------------------------------------------------------------- 7. CRF under O2


def decorate_as_on_a_gpu(calls: list):
    """``paddle.amp.decorate`` as it runs on a GPU. On CPU it returns the model unchanged (its device check in
    ``amp/auto_cast.py``, ``amp_decorate``); past that check, O2 casts the layers' floating parameters with
    ``amp_initialize`` (honouring ``excluded_layers``) and sets the optimiser's multi-precision (float32 master
    weights): exactly what this does. ``calls`` receives each call's arguments."""
    from paddle.amp.auto_cast import _set_multi_precision, amp_initialize

    def decorate(models, optimizers=None, level="O1", dtype="float16", master_weight=None, save_dtype=None,
                 master_grad=False, excluded_layers=None):
        calls.append({"level": level, "dtype": dtype, "excluded_layers": excluded_layers})
        if level == "O2":
            amp_initialize(models=[models], dtype=dtype, excluded_layers=excluded_layers)
            if optimizers is not None:
                _set_multi_precision(optimizers, master_weight is not False)
        return models if optimizers is None else (models, optimizers)

    return decorate


@pytest.mark.parametrize("amp, dtype, low", [("bf16", "bfloat16", paddle.bfloat16),
                                             ("fp16", "float16", paddle.float16)])
def test_crf_under_o2_keeps_its_transitions_float32(tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch, amp,
                                                    dtype, low):
    calls = []
    monkeypatch.setattr(paddle.amp, "decorate", decorate_as_on_a_gpu(calls))
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path, to_static=False, head="crf", amp=amp,
                           amp_level="O2", do_test=False)
    trainer._prepare()
    model = trainer.model
    assert calls == [{"level": "O2", "dtype": dtype, "excluded_layers": [model.crf]}]
    assert model.crf.transitions.dtype == paddle.float32
    # The rest is cast as decorate casts it: the encoder's and the classifier's matrices in low precision.
    assert model.classifier.weight.dtype == low
    assert model.bert.encoder.layers[0].linear1.weight.dtype == low


# ---------------------------------------------------------------- 8. no host sync per step

HOST_READS = ("__float__", "__int__", "__bool__", "__index__", "item", "numpy", "tolist")


def count_host_reads(monkeypatch) -> list:
    """Every read of a tensor's value into Python (what makes the host wait for a GPU), as (method, dtype);
    one per read, though Paddle's ``__bool__`` and ``__float__`` call ``numpy`` inside."""
    reads, inside = [], []
    for name in HOST_READS:
        original = getattr(paddle.Tensor, name)

        def recording(tensor, *args, _original=original, _name=name, **kwargs):
            if not inside:
                reads.append((_name, str(tensor.dtype)))
            inside.append(_name)
            try:
                return _original(tensor, *args, **kwargs)
            finally:
                inside.pop()

        monkeypatch.setattr(paddle.Tensor, name, recording)
    return reads


def reads_per_step(monkeypatch, trainer) -> dict:
    """Host reads between the end of one optimiser step and the end of the next, by step."""
    import pipeline.trainer as trainer_module

    reads, per_step, after_step = count_host_reads(monkeypatch), {}, trainer_module.Trainer._after_step

    def recording_after_step(self, epoch, batch_index):
        per_step[self.progress.step] = list(reads)
        reads.clear()
        return after_step(self, epoch, batch_index)

    monkeypatch.setattr(trainer_module.Trainer, "_after_step", recording_after_step)
    return per_step


@pytest.mark.parametrize("to_static", [True, False])
def test_no_host_sync_per_step_but_the_skip_decision_on_a_gpu(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                              monkeypatch, to_static):
    import pipeline.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "on_gpu", lambda: True)  # the device in use, as the trainer sees it
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", max_steps=5, log_interval=5,
                           eval_interval=0, do_test=False, to_static=to_static, max_grad_norm=1e-3)
    per_step = reads_per_step(monkeypatch, trainer)
    trainer.fit()
    # Steps 2-4 are not log steps (1 holds the set-up): one read each, the boolean that decides whether Paddle's
    # optimiser may apply the step. Neither the norm (clipped on the device: max_grad_norm clips every step
    # here) nor the loss is read.
    assert [per_step[step] for step in (2, 3, 4)] == [[("__bool__", "paddle.bool")]] * 3
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_metrics.jsonl").open()]
    assert [record["step"] for record in logged] == [5] and logged[0]["grad_norm"] > 1e-3  # read on the log step


def test_no_host_sync_per_step_clipping_on_the_device_equals_clipping_after_a_read(tiny_model_dir, tiny_dataset_dir,
                                                                                   tmp_path, monkeypatch):
    import pipeline.trainer as trainer_module

    weights = []
    for simulated_gpu in (False, True):
        monkeypatch.setattr(trainer_module, "on_gpu", lambda: simulated_gpu)
        trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / str(simulated_gpu), max_steps=3,
                               eval_interval=0, do_test=False, to_static=False, max_grad_norm=0.5,
                               matmul_bias_grad=False)
        trainer.fit()
        weights.append({name: tensor.numpy() for name, tensor in trainer.model.state_dict().items()})
    for name, value in weights[0].items():
        np.testing.assert_allclose(weights[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


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


# ---------------------------------------------------------------- 10. metrics = predictions


class AutocastAsOnAGpu:
    """What bf16 autocast changes on a GPU, for Paddle's autocast has no effect on CPU ("amp_guard can only
    be enabled on CUDAPlace", ``amp/auto_cast.py``): every linear layer (white-listed ``matmul``) takes
    bfloat16 inputs and weights and returns bfloat16. Simulated by rounding them to bfloat16 (CPU has the
    cast kernels) around the float32 product. Called like ``paddle.amp.auto_cast``; counts the forwards
    of layers in eval mode (evaluation, not training) that ran under it."""

    def __init__(self):
        self.evaluation_forwards = 0

    @contextlib.contextmanager
    def __call__(self, enable=True, level="O1", dtype="bfloat16", **unused):
        original = paddle.nn.Linear.forward

        def rounded(tensor):
            return tensor.astype(dtype).astype("float32")

        def low_precision_forward(layer, input):
            self.evaluation_forwards += not layer.training
            return rounded(paddle.nn.functional.linear(rounded(input), rounded(layer.weight), layer.bias))

        paddle.nn.Linear.forward = low_precision_forward if enable else original
        try:
            yield
        finally:
            paddle.nn.Linear.forward = original


def test_metrics_equal_predictions_evaluation_during_training_gives_predict_pys_labels(
        tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    import predict
    from pipeline.labels import entity_types
    from pipeline.metrics import EntityCounts
    from pipeline.readers import read_examples

    autocast = AutocastAsOnAGpu()
    monkeypatch.setattr(paddle.amp, "auto_cast", autocast)
    out = tmp_path / "run"
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, amp="bf16", to_static=False, max_steps=24,
                           eval_interval=12, learning_rate=3e-3)
    # The simulation changes the numbers: the training forward's logits are not float32's.
    input_ids = paddle.to_tensor([[2, 10, 11, 12, 3]])
    with autocast():
        simulated = trainer.model(input_ids).numpy()
    assert not np.array_equal(simulated, trainer.model(input_ids).numpy())
    autocast.evaluation_forwards = 0
    result = trainer.fit()
    # Evaluation ran in float32: no dev or test forward went through the (simulated) autocast.
    assert autocast.evaluation_forwards == 0
    best = out / "best_model"
    saved = json.loads((best / "metrics.json").read_text())
    for split in ("dev", "test"):
        examples, _ = read_examples(tiny_dataset_dir / f"{split}.tsv")
        texts = tmp_path / f"{split}.txt"
        texts.write_text("".join("".join(e.tokens) + "\n" for e in examples), encoding="utf-8")
        predicted = tmp_path / f"{split}.jsonl"
        assert predict.main(["--checkpoint", str(best), "--input", str(texts), "--output", str(predicted)]) == 0
        labels = [json.loads(line)["labels"] for line in predicted.read_text(encoding="utf-8").splitlines()]
        counts = EntityCounts(entity_types(trainer.labels))
        counts.update([e.labels for e in examples], labels)
        recomputed = counts.summary()
        assert recomputed["f1"] > 0, "a model that finds no entity would agree trivially"
        for key in ("precision", "recall", "f1", "strict_f1"):
            assert recomputed[key] == saved[split][key], (split, key)
    # The test evaluation's own labels are predict.py's, token for token.
    test_predictions = [json.loads(line)["predicted"] for line in (out / "test_predictions.jsonl").open()]
    assert test_predictions == labels
    assert result.test == saved["test"]


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
