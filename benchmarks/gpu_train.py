"""Training speed and memory of one config with each attention path, as `headwise train` runs it
(the same jitted step, state and shardings), on whatever devices JAX sees: tokens/s, MFU
against the chip's dense bf16 peak, and the compiled step's memory. Random tokens: speed does
not depend on the data, and the machine needs no data set.

    python benchmarks/gpu_train.py [--config gpt2_small] [--batch 32] [--steps 50]
        [--paths fused,chunked,dot_product,reference] [--remat none,dots,full] [--json F]
        [--trace DIR]
"""
import argparse
import json
import pathlib
import shutil
import time

import jax
import numpy as np

from headwise import parallel
from headwise.model import flops_per_token
from headwise.train.config import load_config
from headwise.train.layout import resolve_run
from headwise.train.loop import build_program
from headwise.train.metrics import peak_flops
from headwise.train.profile import time_by_op
from headwise.train.state import create_state

GiB = 2 ** 30


def random_batch(cfg, program, seed: int) -> dict:
    B, T = cfg.train.batch_size // jax.process_count(), cfg.model.context_length
    tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (B, T + 1), np.int32)
    return parallel.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                program.shardings.batch)


def trace_steps(step, state, batch, out_dir: pathlib.Path, steps: int = 3) -> str:
    """A jax.profiler trace of `steps` steps: its Perfetto file copied to `out_dir`, and a
    summary of the device ops."""
    log_dir = out_dir / "trace"
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    trace_gz = next(log_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    shutil.copy(trace_gz, out_dir / "perfetto_trace.json.gz")
    summary = time_by_op(trace_gz, steps)
    shutil.rmtree(log_dir)  # the copy is all that is kept
    return summary


def measure(cfg, steps: int, trace_dir: pathlib.Path | None = None) -> dict:
    """Compile the run's train step, take two warm-up steps, then time `steps` of them (and
    trace three more into `trace_dir`)."""
    program = build_program(cfg, resolve_run(cfg))
    state = create_state(cfg.model, program.optimizer, cfg.train.seed, program.shardings.state)
    batch = random_batch(cfg, program, 0)
    started = time.perf_counter()
    step = program.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    memory = step.memory_analysis()
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    loss = float(metrics["loss"])  # waits for the last step
    seconds = (time.perf_counter() - started) / steps
    tokens = cfg.train.batch_size * cfg.model.context_length
    flops = flops_per_token(cfg.model) * tokens
    stats = jax.devices()[0].memory_stats() or {}
    if trace_dir is not None:
        print(trace_steps(step, state, batch, trace_dir), flush=True)
    return dict(
        attention=cfg.model.attention, remat=cfg.model.remat, unroll=cfg.model.scan_unroll,
        dtype=cfg.model.dtype, batch=cfg.train.batch_size, context=cfg.model.context_length,
        ms_per_step=1e3 * seconds, tokens_per_s=tokens / seconds,
        mfu=flops / seconds / (peak_flops(cfg) * jax.device_count()),
        compile_s=compile_s, loss=loss,
        temp_gib=memory.temp_size_in_bytes / GiB if memory else None,
        args_gib=memory.argument_size_in_bytes / GiB if memory else None,
        peak_gib=stats.get("peak_bytes_in_use", 0) / GiB or None)


def table(rows: list[dict]) -> str:
    head = (f"{'attention':<12}{'remat':<7}{'unroll':>6}{'tokens/s':>11}{'ms/step':>9}{'MFU':>7}"
            f"{'temp GiB':>10}{'args GiB':>10}{'peak GiB':>10}{'compile s':>11}{'loss':>8}")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['attention']:<12}{r['remat']:<7}{r['unroll']:6}  failed: {r['error']}")
            continue
        fmt = lambda v: f"{v:10.2f}" if v is not None else f"{'-':>10}"
        lines.append(f"{r['attention']:<12}{r['remat']:<7}{r['unroll']:6}{r['tokens_per_s']:11,.0f}"
                     f"{r['ms_per_step']:9.1f}{r['mfu']:7.1%}{fmt(r['temp_gib'])}"
                     f"{fmt(r['args_gib'])}{fmt(r['peak_gib'])}{r['compile_s']:11.1f}"
                     f"{r['loss']:8.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2_small")
    parser.add_argument("--batch", type=int, default=32, help="global sequences per step")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--paths", default="dot_product,chunked,fused,reference")
    parser.add_argument("--remat", default="none", help="comma-separated model.remat policies")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", help="also append one JSON row per path to this file")
    parser.add_argument("--trace", type=pathlib.Path,
                        help="trace three steps of the first path into this folder")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"{device.device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"config {args.config}, batch {args.batch}, {args.steps} timed steps")
    rows = []
    runs = [(path, remat) for path in args.paths.split(",") for remat in args.remat.split(",")]
    for i, (path, remat) in enumerate(runs):
        cfg = load_config(args.config, [f"model.attention={path}", f"model.remat={remat}",
                                        f"train.batch_size={args.batch}", "train.grad_accum=1",
                                        *args.set])
        try:
            row = measure(cfg, args.steps, args.trace if i == 0 else None)
        except Exception as error:  # out of memory on one path must not lose the others
            row = dict(attention=path, remat=remat, unroll=cfg.model.scan_unroll,
                       error=str(error).splitlines()[0][:160])
        rows.append(row | {"device": device.device_kind, "jax": jax.__version__})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
