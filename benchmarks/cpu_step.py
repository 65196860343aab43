"""The CPU training step taken apart: forward, gradient and whole step at nanoGPT's CPU config, at
a 6-layer, 384-wide model and at `headwise train`'s default, as ratios and as achieved FLOP/s over
this machine's measured matmul peak; and, with --compile, GPT-2 small's forward+backward compile
time. Steps and compiles with the XLA options train.step compiles with here, and the train step
and the compile at XLA's defaults beside them, as ratios.

    python benchmarks/cpu_step.py [--rounds 5] [--compile]
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 python benchmarks/cpu_step.py    # AVX2 code, emulated

Times are medians over rounds in which every function runs in turn (the machine's speed drifts);
CPU model, vector extensions, load and versions are printed beside them.
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import machine
from headwise.model import ModelConfig, flops_per_token, init_params, loss, param_axes
from headwise.model.compiler import compiler_options
from headwise.parallel.launch import keep_freed_memory
from headwise.train.config import OptimConfig, RunConfig
from headwise.train.optim import learning_rate, make_optimizer
from headwise.train.step import init_state, make_train_step

# nanoGPT's CPU run (configs/shakespeare_char.toml), its 6-layer, 384-wide GPU model at a
# CPU-sized batch, and `headwise train`'s default model and batch.
MODELS = {
    "nanogpt-cpu": (ModelConfig(vocab_size=65, context_length=64, d_model=128, n_heads=4,
                                d_head=32, n_layers=4, d_mlp=512, bias=False, position="rope",
                                scan_unroll=4), 12),
    "6x384": (ModelConfig(vocab_size=65, context_length=256, d_model=384, n_heads=6, d_head=64,
                          n_layers=6, d_mlp=1536, bias=False, position="rope"), 4),
    "default": (RunConfig().model, RunConfig().train.batch_size),
}


def emulation() -> str:
    """What the environment asks of XLA and torch's code generation (an ISA cap emulates an
    older machine: say so beside the figures)."""
    asked = {k: os.environ[k] for k in ("XLA_FLAGS", "ATEN_CPU_CAPABILITY") if os.environ.get(k)}
    return ", ".join(f"{k}={v}" for k, v in asked.items()) or "none"


def _seconds(fn, *args, n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call. Under load from other jobs the CPU time is the
    steadier measure of the work done; the wall time is what a user waits."""
    jax.block_until_ready(fn(*args))
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n, (time.process_time() - start_cpu) / n


def interleaved_both(fns: dict, rounds: int, n: int) -> tuple[dict, dict]:
    """Median (wall, CPU) seconds per call of each (fn, args), every round running all of
    them in turn."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn, args = fns[name]
            times[name].append(_seconds(fn, *args, n=n))
    return tuple({name: statistics.median(t[i] for t in ts) for name, ts in times.items()}
                 for i in (0, 1))


def interleaved(fns: dict, rounds: int, n: int) -> dict:
    """Median wall seconds per call of each (fn, args), as `interleaved_both`."""
    return interleaved_both(fns, rounds, n)[0]


def matmul_peak(rounds: int) -> dict:
    """The best f32 GFLOP/s XLA's own matmul reaches here, over square sizes: the ceiling the
    model's achieved FLOP/s is a fraction of."""
    fns = {}
    for n in (256, 512, 1024):
        a = jax.random.normal(jax.random.key(n), (n, n))
        fns[n] = (jax.jit(lambda a, b: a @ b), (a, a))
    secs = interleaved(fns, rounds, n=10)
    gflops = {n: 2 * n ** 3 / s / 1e9 for n, s in secs.items()}
    return {"gflop_s_by_size": {n: round(g, 1) for n, g in gflops.items()},
            "peak_gflop_s": round(max(gflops.values()), 1)}


# What train.step compiles with on this machine's platform; {} is XLA's defaults.
OPTIONS = compiler_options(jax.default_backend())


def step_figures(cfg: ModelConfig, batch: int, rounds: int, peak: float) -> dict:
    """Forward (loss), gradient (value_and_grad) and the whole jitted train step (AdamW, clip),
    compiled as train.step compiles them; and the train step at XLA's default options."""
    params = init_params(cfg, jax.random.key(0))
    T = cfg.context_length
    tokens = jax.random.randint(jax.random.key(1), (batch, T), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    optim = OptimConfig()
    optimizer = make_optimizer(optim, 1000, param_axes(cfg))
    batch_tree = {"inputs": tokens, "targets": targets}

    def train_call(options: dict):
        step = make_train_step(cfg, optimizer, learning_rate(optim, 1000), compiler_options=options)
        state = init_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(2))

        def call(batch_tree):  # the state is donated: carry it along
            nonlocal state
            state, metrics = step(state, batch_tree)
            return metrics
        return call

    fns = {"forward": (jax.jit(lambda p, x, y: loss(p, x, y, cfg), compiler_options=OPTIONS),
                       (params, tokens, targets)),
           "gradient": (jax.jit(jax.value_and_grad(lambda p, x, y: loss(p, x, y, cfg)),
                                compiler_options=OPTIONS), (params, tokens, targets)),
           "train_step": (train_call(OPTIONS), (batch_tree,))}
    if OPTIONS:
        fns["train_step_xla_defaults"] = (train_call({}), (batch_tree,))
    once = _seconds(fns["gradient"][0], *fns["gradient"][1], n=1)[0]
    n = max(2, int(0.5 / once))  # about half a second a block
    secs, cpu = interleaved_both(fns, rounds, n)
    train_flops = flops_per_token(cfg, T) * batch * T
    return {"batch": batch, "context": T,
            "ms": {k: round(1000 * s, 2) for k, s in secs.items()},
            "cpu_ms": {k: round(1000 * s, 2) for k, s in cpu.items()},
            "gradient_over_forward": round(secs["gradient"] / secs["forward"], 2),
            "gradient_over_forward_cpu": round(cpu["gradient"] / cpu["forward"], 2),
            "train_step_tokens_per_s": round(batch * T / secs["train_step"]),
            "train_step_gflop_s": round(train_flops / secs["train_step"] / 1e9, 1),
            "fraction_of_matmul_peak": round(train_flops / secs["train_step"] / 1e9 / peak, 3),
            **({"train_step_over_xla_defaults": round(secs["train_step"]
                                                      / secs["train_step_xla_defaults"], 3),
                "train_step_over_xla_defaults_cpu": round(cpu["train_step"]
                                                          / cpu["train_step_xla_defaults"], 3)}
               if OPTIONS else {})}


def _compile_once(cfg: ModelConfig, batch: int, options: dict) -> tuple[float, float, float]:
    """(trace+lower s, compile s, compile CPU s) of the model's forward+backward (value_and_grad
    of the loss) from shapes, cold: JAX's in-memory caches emptied first."""
    jax.clear_caches()
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, cfg.context_length), jnp.int32)
    grad = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, x, cfg)), compiler_options=options)
    start = time.perf_counter()
    lowered = grad.lower(shapes, tokens)
    lowered_at, lowered_cpu = time.perf_counter(), time.process_time()
    lowered.compile()
    return (lowered_at - start, time.perf_counter() - lowered_at,
            time.process_time() - lowered_cpu)


def compile_seconds(rounds: int, preset: str = "gpt2-small", batch: int = 8) -> dict:
    """Medians over rounds of the cold compile with train.step's options and with XLA's
    defaults, the two alternating; the ratio is with ÷ without."""
    cfg = ModelConfig.preset(preset)
    runs = {"options": [], "xla_defaults": []}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            runs[name].append(_compile_once(cfg, batch, OPTIONS if name == "options" else {}))
    med = {name: [statistics.median(t[i] for t in ts) for i in range(3)]
           for name, ts in runs.items()}
    return {"model": preset, "options": OPTIONS, "rounds": rounds,
            **{f"{name}_{k}": round(m[i], 2) for name, m in med.items()
               for i, k in enumerate(("trace_lower_s", "compile_s", "compile_cpu_s"))},
            "compile_ratio": round(med["options"][1] / med["xla_defaults"][1], 2),
            "compile_cpu_ratio": round(med["options"][2] / med["xla_defaults"][2], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--compile", action="store_true", help="also time GPT-2 small's compile")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as `headwise train` starts
    print(f"# {machine.describe('numpy')}; emulation: {emulation()}; freed memory kept: {kept}")
    result = {"matmul": matmul_peak(args.rounds)}
    peak = result["matmul"]["peak_gflop_s"]
    for name in filter(None, args.models.split(",")):  # --models "": compile time only
        cfg, batch = MODELS[name]
        result[name] = step_figures(cfg, batch, args.rounds, peak)
    if args.compile:
        result["compile"] = compile_seconds(args.rounds)
    result["load_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
