"""Memory against time: compiled temporary memory of the train step and its time, per setting
(by default each rematerialization policy, model.remat = none | dots | full), the steps
interleaved in one process; the first setting is the baseline.

    python benchmarks/remat.py [--layers 4] [--batch 2] [--context 512] [--rounds 3]
        [--attention dot_product] [--dtype float32] [--no-time]
    python benchmarks/remat.py --vocab 50257 --variants loss_chunk=0,loss_chunk=256

GPT-2-small-wide blocks (12 heads of 64, width 768) over a byte vocabulary (or --vocab), AdamW.
"""
import argparse
import dataclasses
import statistics
import time

import jax

from headwise.model import ModelConfig, init_params, param_axes
from headwise.train.config import OptimConfig
from headwise.train.optim import learning_rate, make_optimizer
from headwise.train.step import init_state, make_train_step
from machine import describe

POLICIES = "remat=none,remat=dots,remat=full"


def compiled_step(cfg: ModelConfig, B: int):
    """The jitted train step, compiled for a [B, T] batch, and a state and batch to run it on."""
    optim = OptimConfig()
    optimizer = make_optimizer(optim, 1000, param_axes(cfg))
    step = make_train_step(cfg, optimizer, learning_rate(optim, 1000))
    state = init_state(init_params(cfg, jax.random.key(0)), optimizer, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (B, cfg.context_length), 0, cfg.vocab_size)
    batch = {"inputs": tokens, "targets": tokens}
    return step.lower(state, batch).compile(), state, batch


def seconds_per_step(compiled, state, batch, steps: int = 2):
    state, metrics = compiled(state, batch)  # warm
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - started) / steps, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attention", default="dot_product")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--variants", default=POLICIES, help="model FIELD=VALUE settings")
    parser.add_argument("--no-time", action="store_true", help="compile only: memory figures")
    args = parser.parse_args()
    base = ModelConfig.preset("gpt2-small", n_layers=args.layers, vocab_size=args.vocab,
                              context_length=args.context, attention=args.attention,
                              dtype=args.dtype)
    print(describe())
    print(f"{args.layers} blocks 768 wide, vocabulary {args.vocab}, batch {args.batch} x "
          f"{args.context}, {args.attention}, {args.dtype}")
    runs = {}
    for variant in args.variants.split(","):
        field, value = variant.split("=")
        cfg = dataclasses.replace(base, **{field: int(value) if value.isdigit() else value})
        compiled, state, batch = compiled_step(cfg, args.batch)
        runs[variant] = [compiled, state, batch, []]
        print(f"{variant:<16} train step temp "
              f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:9,.0f} MiB", flush=True)
    if args.no_time:
        return
    for _ in range(args.rounds):  # interleaved, so the machine's drift hits every policy alike
        for run in runs.values():
            seconds, run[1] = seconds_per_step(*run[:3])
            run[3].append(seconds)
    first = next(iter(runs))
    baseline = statistics.median(runs[first][3])
    for variant, run in runs.items():
        median = statistics.median(run[3])
        print(f"{variant:<16} {median * 1e3:8.0f} ms/step  x{median / baseline:.2f} of {first} "
              f"(rounds {', '.join(f'{s * 1e3:.0f}' for s in run[3])})")


if __name__ == "__main__":
    main()
