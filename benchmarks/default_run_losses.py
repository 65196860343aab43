"""The default run's first N per-step losses and grad norms, as exact float hex, to compare two
versions of the code bit for bit (a refactor must not move a single bit).

    python benchmarks/default_run_losses.py before.json      # on the old commit
    python benchmarks/default_run_losses.py after.json       # on the new one
    cmp before.json after.json
"""
import argparse
import json
import pathlib
import tempfile

from headwise.train.config import load_config
from headwise.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    cfg = load_config(None, ["train.log_every=1"])
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir, progress=False, stop_at=args.steps)
        lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    losses = {r["step"]: (r["loss"].hex(), r["grad_norm"].hex()) for r in rows if "loss" in r}
    evals = [(r["step"], r["eval_loss"].hex()) for r in rows if "eval_loss" in r]
    pathlib.Path(args.out).write_text(json.dumps({"losses": losses, "evals": evals}, indent=0))
    print(f"{len(losses)} steps, loss {float.fromhex(losses[1][0]):.6f} -> "
          f"{float.fromhex(losses[args.steps][0]):.6f}; wrote {args.out}")


if __name__ == "__main__":
    main()
