"""The matmul floor of a training step: its matrix products at the fastest float32 GEMM this machine offers.

    python -m bench.gemm_floor --dims '{"layers": 6, "hidden": 512, ...}' --batch 16 --seq 46   # every library
    python -m bench.gemm_floor ... --variant numpy_openblas --out rates.json                  # one, in this process

A floor measured with one library's code path is a floor of that path, not of the machine (MKL on an
AMD processor runs whichever path MKL_DEBUG_CPU_TYPE names; OpenBLAS picks its kernels by the core it
detects). So every library we could train with is timed at the step's shapes, each in a fresh
process (MKL and OpenBLAS read their variables when they are loaded), with the thread count
pipeline.cpu_env gives training, and each product takes the fastest library: the floor is what the
machine's best GEMMs would need for the step's matrix products, nothing else counted.

Nothing here imports Paddle at module level: a child sets the thread and library variables first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from pipeline.cpu_env import (MKL_AVX2_PATH, MKL_AVX512_PATH, MKL_XEON_PHI_PATH, apply_cpu_settings,
                              apply_cpu_thread_settings)

ROOT = Path(__file__).resolve().parent.parent

# MKL's Xeon Phi path crashes in MKL's vector math off Xeon Phi (pipeline.cpu_env), not in its GEMM, so
# where the processor has AVX-512 it is still a GEMM this machine offers and is timed.
OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# OpenBLAS's kernel set for AVX-512 processors (DYNAMIC_ARCH builds accept it as OPENBLAS_CORETYPE).
OPENBLAS_AVX512_CORE = "SkylakeX"
# Every GEMM this module knows how to time; ``variants`` picks those that apply to this machine.
VARIANT_NAMES = ("paddle_mkl", "paddle_mkl_own_path", "paddle_mkl_avx2", "paddle_mkl_avx512",
                 "paddle_mkl_xeon_phi", "paddle_onednn", "numpy_openblas", "numpy_openblas_avx512")


# ====================================================================== the step's products


def _linear_layouts(rows: int, k: int, n: int):
    """Matmul shapes of a Linear [rows, k] -> [rows, n]: forward, input gradient, weight gradient."""
    return [("fwd", (rows, k), (k, n)), ("dx", (rows, n), (n, k)), ("dw", (k, rows), (rows, n))]


def matmul_kinds(dims: dict, batch: int, seq: int) -> dict:
    """Per kind: (count per step, list of (layout, a shape, b shape)); each matmul is 2*m*k*n FLOPs."""
    h, i, heads, layers, classes = (dims[k] for k in ("hidden", "intermediate", "heads", "layers", "classes"))
    rows, groups, head_dim = batch * seq, batch * heads, h // heads
    return {
        "qkv_out_proj": (4 * layers, _linear_layouts(rows, h, h)),
        "ffn_in": (layers, _linear_layouts(rows, h, i)),
        "ffn_out": (layers, _linear_layouts(rows, i, h)),
        "classifier": (1, _linear_layouts(rows, h, classes)),
        # scores Q@K^T and, in backward, dP = dC@V^T: [s, d] @ [d, s]
        "attn_sd_ds": (2 * layers, [("bmm", (groups, seq, head_dim), (groups, head_dim, seq))]),
        # context P@V, and dQ = dS@K, dK = dS^T@Q, dV = P^T@dC: [s, s] @ [s, d]
        "attn_ss_sd": (4 * layers, [("bmm", (groups, seq, seq), (groups, seq, head_dim))]),
    }


def matmul_flops(a, b) -> float:
    """FLOPs of ``a @ b`` (2-D, or 3-D batched over the first axis)."""
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def step_flops(dims: dict, batch: int, seq: int) -> dict:
    """Matmul FLOPs of one training step per kind (forward + both backward matmuls)."""
    return {kind: count * sum(matmul_flops(a, b) for _, a, b in layouts)
            for kind, (count, layouts) in matmul_kinds(dims, batch, seq).items()}


# ====================================================================== the libraries


def variants(environ=os.environ, isa: str | None = None) -> dict[str, str]:
    """The GEMMs to time on this machine, name -> what it is; chosen by the instruction set detected now.

    ``environ`` holds the variables pipeline.cpu_env set for training (MKL_DEBUG_CPU_TYPE among them).
    """
    isa = isa if isa is not None else common.instruction_set(common.cpu_flags())
    current = environ.get("MKL_DEBUG_CPU_TYPE")
    chosen = {
        "paddle_mkl": f"paddle.matmul (MKL), MKL_DEBUG_CPU_TYPE={current}, as training runs"
        if current else "paddle.matmul (MKL), MKL's own path, as training runs",
    }
    if current:
        chosen["paddle_mkl_own_path"] = "paddle.matmul (MKL), MKL_DEBUG_CPU_TYPE unset: MKL's own path"
    if current != MKL_AVX2_PATH and isa in ("avx512", "avx2"):
        chosen["paddle_mkl_avx2"] = f"paddle.matmul (MKL), MKL_DEBUG_CPU_TYPE={MKL_AVX2_PATH}: MKL's AVX2 path"
    if current != MKL_AVX512_PATH and isa == "avx512":
        chosen["paddle_mkl_avx512"] = f"paddle.matmul (MKL), MKL_DEBUG_CPU_TYPE={MKL_AVX512_PATH}: MKL's AVX-512 path"
    if current != MKL_XEON_PHI_PATH and isa == "avx512":
        chosen["paddle_mkl_xeon_phi"] = (f"paddle.matmul (MKL), MKL_DEBUG_CPU_TYPE={MKL_XEON_PHI_PATH}: MKL's Xeon Phi "
                                         f"path (its GEMM runs on AMD; its vector math does not)")
    # Paddle's dygraph matmul takes the CPU (MKL) kernel even with FLAGS_use_onednn=1 (its kernel key stays
    # CPU under GLOG_v=6): oneDNN's matmul is reached through Paddle Inference, as predict.py's engine does.
    chosen["paddle_onednn"] = "Paddle Inference with oneDNN (enable_onednn), one-matmul program"
    chosen["numpy_openblas"] = (f"numpy.matmul (OpenBLAS), {'/'.join(OPENBLAS_VARIABLES)} unset: "
                                f"OpenBLAS's own kernels for the detected core")
    if isa == "avx512":
        chosen["numpy_openblas_avx512"] = (f"numpy.matmul (OpenBLAS), OPENBLAS_CORETYPE={OPENBLAS_AVX512_CORE}: "
                                           f"its AVX-512 kernels")
    return chosen


def variant_environment(name: str, environ: dict) -> dict:
    """The environment of the child timing ``name``: training's settings, then that library's own."""
    env = dict(environ)
    if name == "paddle_mkl_own_path":
        env.pop("MKL_DEBUG_CPU_TYPE", None)
    elif name == "paddle_mkl_avx2":
        env["MKL_DEBUG_CPU_TYPE"] = MKL_AVX2_PATH
    elif name == "paddle_mkl_avx512":
        env["MKL_DEBUG_CPU_TYPE"] = MKL_AVX512_PATH
    elif name == "paddle_mkl_xeon_phi":
        env["MKL_DEBUG_CPU_TYPE"] = MKL_XEON_PHI_PATH
    elif name.startswith("numpy_openblas"):
        # Unset for this measurement only: whatever a site profile sets must not pick a slower kernel.
        for variable in OPENBLAS_VARIABLES:
            env.pop(variable, None)
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"]
        if name == "numpy_openblas_avx512":
            env["OPENBLAS_CORETYPE"] = OPENBLAS_AVX512_CORE
    return env


def _fastest(run, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls after two warm-up calls.

    The minimum: a busy moment on a shared machine can only slow a call down, so it is the stable
    (and the lowest, most demanding) figure.
    """
    for _ in range(2):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _paddle_runner():
    import paddle

    paddle.set_device("cpu")

    def runner(a_shape, b_shape):
        a, b = paddle.randn(list(a_shape), dtype="float32"), paddle.randn(list(b_shape), dtype="float32")
        paddle.matmul(a, b).numpy()  # makes sure the kernel really ran; dygraph CPU kernels run synchronously
        return lambda: paddle.matmul(a, b)

    return runner, {"paddle": common.package_version("paddlepaddle")}


def _onednn_runner(workdir: Path, threads: int):
    import numpy as np
    import paddle
    from paddle import inference
    from paddle.static import InputSpec

    from pipeline.engines import paddle_inference_config

    class Matmul(paddle.nn.Layer):
        def forward(self, a, b):
            return paddle.matmul(a, b)

    predictors = {}

    def predictor(rank: int):
        # One program per rank (2-D, 3-D), any sizes: oneDNN makes (and caches) a primitive per shape.
        if rank not in predictors:
            prefix = workdir / f"matmul{rank}d"
            spec = [InputSpec([None] * rank, "float32", name) for name in ("a", "b")]
            paddle.jit.save(paddle.jit.to_static(Matmul(), input_spec=spec, full_graph=True), str(prefix))
            program = next(p for p in workdir.iterdir() if p.name.startswith(prefix.name) and
                           p.suffix in (".json", ".pdmodel"))
            # No weights: the params file named is never written, and Paddle Inference needs none.
            config = paddle_inference_config(program, f"{prefix}.pdiparams", use_gpu=False, threads=threads,
                                             onednn=True, ir_optim=True, memory_optim=False)
            predictors[rank] = inference.create_predictor(config)
        return predictors[rank]

    def runner(a_shape, b_shape):
        engine = predictor(len(a_shape))
        rng = np.random.default_rng(0)
        for name, shape in zip(engine.get_input_names(), (a_shape, b_shape)):
            engine.get_input_handle(name).copy_from_cpu(rng.standard_normal(shape, dtype=np.float32))
        return engine.run

    return runner, {"paddle": common.package_version("paddlepaddle")}


def _numpy_runner():
    import numpy as np

    rng = np.random.default_rng(0)

    def runner(a_shape, b_shape):
        a, b = rng.standard_normal(a_shape, dtype=np.float32), rng.standard_normal(b_shape, dtype=np.float32)
        return lambda: np.matmul(a, b)

    library = {"numpy": np.__version__}
    try:  # which kernels OpenBLAS chose at run time ("Zen", "SkylakeX", ...): threadpoolctl reads them
        from threadpoolctl import threadpool_info

        library["blas"] = [{k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                           for info in threadpool_info() if info.get("user_api") == "blas"]
    except ImportError:
        library["blas"] = "threadpoolctl not installed: kernels not reported"
    return runner, library


def measure_variant(name: str, dims: dict, batch: int, seq: int, reps: int, workdir: Path) -> dict:
    """GFLOP/s per kind of one library at the step's shapes, in this process (its variables already set)."""
    threads = int(os.environ["OMP_NUM_THREADS"])
    if name.startswith("numpy"):
        runner, library = _numpy_runner()
    elif name == "paddle_onednn":
        runner, library = _onednn_runner(workdir, threads)
    else:
        runner, library = _paddle_runner()
    rates, seconds_per_product = {}, {}
    for kind, (_, layouts) in matmul_kinds(dims, batch, seq).items():
        flops = seconds = 0.0
        for layout, a_shape, b_shape in layouts:
            fastest = _fastest(runner(a_shape, b_shape), reps)
            seconds_per_product[f"{kind}.{layout}"] = fastest
            flops += matmul_flops(a_shape, b_shape)
            seconds += fastest
        rates[kind] = flops / seconds
    return {"variant": name, "ok": True, "batch": batch, "seq": seq, "rates_flops_per_s": rates,
            "seconds_per_product": seconds_per_product, "library": library, "threads": common.thread_settings(),
            "library_variables": {name: os.environ.get(name) for name in ("MKL_DEBUG_CPU_TYPE", "OPENBLAS_NUM_THREADS",
                                                                           *OPENBLAS_VARIABLES)}}


# ====================================================================== the parent side


def measure_all(dims: dict, batch: int, seq: int, reps: int, workdir: Path, timeout: float = 1800,
                names=None) -> dict:
    """Every variant (or ``names``), each in a fresh process; a variant that fails is recorded, not fatal."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ)
    apply_cpu_thread_settings(base)  # training's threads and MKL path, as each child would set them (malloc: there)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    descriptions = variants(base)
    results = {}
    for name in names or descriptions:
        out, log = workdir / f"gemm_{name}.json", workdir / f"gemm_{name}.log"
        cmd = [sys.executable, "-m", "bench.gemm_floor", "--variant", name, "--dims", json.dumps(dims),
               "--batch", str(batch), "--seq", str(seq), "--reps", str(reps), "--out", str(out),
               "--workdir", str(workdir / name)]
        with open(log, "w", encoding="utf-8") as handle:
            proc = subprocess.run(cmd, cwd=ROOT, env=variant_environment(name, base), stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode == 0:
            results[name] = json.loads(out.read_text(encoding="utf-8"))
        else:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            results[name] = {"variant": name, "ok": False, "error": f"exit {proc.returncode}: {' '.join(tail)}",
                             "log": str(log)}
        results[name]["description"] = descriptions.get(name, name)
    return results


def fastest_rates(results: dict) -> dict:
    """Per kind: the fastest library's rate and its name, over the variants that ran."""
    best = {}
    for name, result in results.items():
        for kind, rate in (result.get("rates_flops_per_s") or {}).items() if result.get("ok") else ():
            if kind not in best or rate > best[kind][0]:
                best[kind] = (rate, name)
    if not best:
        raise RuntimeError("no GEMM library could be timed: " +
                           "; ".join(f"{n}: {r.get('error')}" for n, r in results.items()))
    return {kind: {"flops_per_s": rate, "variant": name} for kind, (rate, name) in best.items()}


def floor_seconds(flops_by_kind: dict, rates: dict) -> float:
    """Seconds the step's products need at ``rates`` (kind -> FLOP/s)."""
    return sum(flops / rates[kind] for kind, flops in flops_by_kind.items())


def isa_line(info: dict) -> str:
    """The processor as detected at run time: vendor, model, instruction set, the flags that matter."""
    return (f"{info.get('vendor') or 'unknown vendor'}, {info.get('cpu')}: instruction set "
            f"{info.get('instruction_set')} (flags: {' '.join(info.get('isa_flags') or []) or 'none of note'})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", required=True, help="JSON: layers, hidden, heads, intermediate, classes")
    parser.add_argument("--batch", type=int, required=True, help="sentences per step")
    parser.add_argument("--seq", type=int, required=True, help="tokens per sentence (the padded length)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per product, the fastest kept (10)")
    parser.add_argument("--variant", choices=VARIANT_NAMES,
                        help="time this one library in this process (the parent's child mode)")
    parser.add_argument("--out", help="JSON of the result")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    try:
        dims = json.loads(args.dims)
        missing = {"layers", "hidden", "heads", "intermediate", "classes"} - set(dims)
    except json.JSONDecodeError as error:
        parser.error(f"--dims is not JSON: {error}")
    if missing:
        parser.error(f"--dims lacks {sorted(missing)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gemm_floor-"))
    if args.variant:
        apply_cpu_settings()  # what the parent did not set; before Paddle or NumPy loads its library
        if args.variant == "paddle_mkl_own_path":
            # apply_cpu_settings has just put back the MKL path the parent removed for this variant (on AMD
            # it sets one whenever none is set): MKL reads the variable when Paddle loads it, so remove it here.
            os.environ.pop("MKL_DEBUG_CPU_TYPE", None)
        workdir.mkdir(parents=True, exist_ok=True)
        result = measure_variant(args.variant, dims, args.batch, args.seq, args.reps, workdir)
        text = json.dumps(result)
        Path(args.out).write_text(text, encoding="utf-8") if args.out else print(text)
        return 0
    info = common.machine_info()
    print(f"processor  {isa_line(info)}")
    results = measure_all(dims, args.batch, args.seq, args.reps, workdir)
    flops = step_flops(dims, args.batch, args.seq)
    print(variants_table(results, flops))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


def variants_table(results: dict, flops_by_kind: dict) -> str:
    """GFLOP/s per kind and library, each library's floor, and the floor of the fastest per kind."""
    ran = [name for name, result in results.items() if result.get("ok")]
    best = fastest_rates(results)
    rows = []
    for kind in flops_by_kind:
        cells = [f"{results[n]['rates_flops_per_s'][kind] / 1e9:.1f}" + ("*" if best[kind]["variant"] == n else "")
                 for n in ran]
        rows.append([kind, f"{flops_by_kind[kind] / 1e9:.2f}", *cells])
    rows.append(["floor s/step", "", *(f"{floor_seconds(flops_by_kind, results[n]['rates_flops_per_s']):.3f}"
                                       for n in ran)])
    lines = [common.table(rows, ["matmul kind", "GFLOP/step", *ran])]
    lines.append("* fastest for that kind; the floor takes it for each kind: "
                 f"{floor_seconds(flops_by_kind, {k: v['flops_per_s'] for k, v in best.items()}):.3f} s/step")
    lines += [f"  {name}: {result['description']}" + ("" if result.get("ok") else f" -- FAILED, {result['error']}")
              for name, result in results.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
