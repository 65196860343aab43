"""The persistent compilation cache: seconds to compile the train step in a fresh process with
no cache, with an empty cache (compile and write), and with that cache filled (read).

    python benchmarks/compile_cache.py [--config gpt2_small] [--batch 8] [--rounds 3]

Each measurement is its own process (a cache only helps a new process); the rounds alternate
the three kinds, and the medians and their ratios are printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(config: str, batch: int, cache: str) -> None:
    """In a fresh process: build the run's train step and time lower + compile."""
    from headwise.train import compile_cache
    if cache != "none":
        compile_cache.enable(__import__("pathlib").Path(cache))
    import jax
    from headwise.train.config import load_config
    from headwise.train.layout import resolve_run
    from headwise.train.loop import build_program
    cfg = load_config(config, [f"train.batch_size={batch}", "train.grad_accum=1",
                               "model.context_length=1024"])
    program = build_program(cfg, resolve_run(cfg))
    state = program.shardings.abstract
    tokens = jax.ShapeDtypeStruct((batch, cfg.model.context_length), jax.numpy.int32)
    started = time.perf_counter()
    program.train_step.lower(state, {"inputs": tokens, "targets": tokens}).compile()
    print(json.dumps({"seconds": time.perf_counter() - started}))


def measure(config: str, batch: int, cache: str) -> float:
    done = subprocess.run([sys.executable, __file__, "--child", cache, "--config", config,
                           "--batch", str(batch)], capture_output=True, text=True, check=True,
                          env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "")))
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt2_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.config, args.batch, args.child)
    from machine import describe
    print(describe())
    times = {"no cache": [], "empty cache": [], "filled cache": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            times["no cache"].append(measure(args.config, args.batch, "none"))
            times["empty cache"].append(measure(args.config, args.batch, folder))
            times["filled cache"].append(measure(args.config, args.batch, folder))
    base = statistics.median(times["no cache"])
    print(f"train step of --config {args.config}, batch {args.batch}: lower + compile")
    for kind, seconds in times.items():
        print(f"{kind:<13} {statistics.median(seconds):6.2f} s  x{statistics.median(seconds) / base:.2f}"
              f"  (rounds {', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
