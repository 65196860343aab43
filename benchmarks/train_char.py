"""nanoGPT's Shakespeare-char CPU run with headwise: final validation loss, wall time, tokens/s.

    python benchmarks/train_char.py --data ../shared/data/tinyshakespeare.txt
nanoGPT reaches a validation loss of 1.88 on this configuration (its README).
"""
import argparse
import json
import pathlib
import platform
import tempfile
import time

import jax

from headwise.train.config import load_config
from headwise.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    cfg = load_config("shakespeare_char", [f"data.path={args.data}", *args.set])
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = train(cfg, run_dir)
        wall = time.perf_counter() - started
        rows = [json.loads(l) for l in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    print(json.dumps({
        "final_val_loss": round(result["eval_loss"], 4), "nanogpt_val_loss": 1.88,
        "steps": result["step"], "wall_s": round(wall, 1),
        "median_tokens_per_s": round(sorted(speeds)[len(speeds) // 2]),
        "ms_per_iter": round(1000 * cfg.train.batch_size * cfg.model.context_length
                             / sorted(speeds)[len(speeds) // 2], 1),
        "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()}, {len(jax.devices())} device(s)",
    }, indent=1))


if __name__ == "__main__":
    main()
