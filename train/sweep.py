"""`headwise sweep`: a ladder of model widths trained on the same data and token budget, and the
power law their losses follow (the explanation's closing point: bigger models do better)."""
import dataclasses
import json
import pathlib
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from headwise.model import count_params, flops_per_token

from .config import RunConfig
from .loop import train


def ladder_config(cfg: RunConfig, width: int, steps: int) -> RunConfig:
    """The run for one rung: d_model = width, d_mlp = 4 x width, the head width kept and
    heads = width / head width; the same data, batch, context and steps as every other rung.
    Evaluated once, at the end, on the same validation batches."""
    head = cfg.model.d_head
    if width % head or width < head:
        raise ValueError(f"--widths: {width} is not a multiple of model.d_head={head} (the head "
                         f"width is fixed; heads = width / d_head); pick multiples of {head}")
    model = dataclasses.replace(cfg.model, d_model=width, d_mlp=4 * width, n_heads=width // head)
    train_cfg = dataclasses.replace(cfg.train, steps=steps, eval_every=steps,
                                    checkpoint_every=steps, log_every=min(cfg.train.log_every, steps))
    return dataclasses.replace(cfg, model=model, train=train_cfg)


def rung_row(cfg: RunConfig, eval_loss: float, seconds: float) -> dict:
    """One model's line of sweep.jsonl. `flops`: its training compute, 6 per weight per token
    plus attention (model.flops_per_token) times the tokens it saw."""
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.context_length
    return {"width": cfg.model.d_model, "heads": cfg.model.n_heads,
            "params": count_params(cfg.model)["total"], "tokens": tokens,
            "flops": flops_per_token(cfg.model) * tokens, "eval_loss": eval_loss,
            "seconds": round(seconds, 1)}


def fit_power_law(x, y) -> tuple[float, float]:
    """(a, alpha) of y = a * x^-alpha, by least squares on log y against log x."""
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(np.exp(intercept)), float(-slope)


def read_rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class _Follow:
    """Moves one progress bar along the step count a run writes to its metrics.jsonl, so the
    whole ladder shows as one bar without the loop knowing it is part of a sweep."""

    def __init__(self, bar, run_dir: pathlib.Path, offset: int):
        self.bar, self.path, self.offset = bar, run_dir / "metrics.jsonl", offset
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self.done.wait(1.0):
            rows = read_rows(self.path) if self.path.exists() else []
            steps = [r["step"] for r in rows if "loss" in r]
            if steps:
                self.bar.n = self.offset + max(steps)
                self.bar.refresh()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def sweep(cfg: RunConfig, widths: list[int], steps: int, out, progress: bool = True) -> list[dict]:
    """Train each width in turn (a rung already in out/sweep.jsonl is kept, so a stopped sweep
    goes on where it was), then draw out/sweep.png. Returns the rows, smallest first."""
    out = pathlib.Path(out)
    rungs = [ladder_config(cfg, w, steps) for w in sorted(set(widths))]  # all checked first
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.jsonl"
    done = {r["width"]: r for r in read_rows(path)}
    bar = tqdm(total=steps * len(rungs), desc="sweep", unit="step", disable=not progress,
               dynamic_ncols=True)
    for i, rung in enumerate(rungs):
        width = rung.model.d_model
        bar.set_postfix(width=width, params=f"{count_params(rung.model)['total']:,}")
        if width not in done:
            started, run_dir = time.perf_counter(), out / f"width-{width}"
            with _Follow(bar, run_dir, i * steps):
                result = train(rung, run_dir, progress=False)
            if result.get("step", steps) < steps:  # Ctrl-C or SIGTERM: the loop saved it
                tqdm.write(f"sweep stopped in width {width} at step {result['step']}; run the "
                           f"same command again to go on from there")
                break
            done[width] = rung_row(rung, result["eval_loss"], time.perf_counter() - started)
            with path.open("a") as f:
                f.write(json.dumps(done[width]) + "\n")
        bar.n = (i + 1) * steps
        bar.set_postfix(width=width, eval_loss=f"{done[width]['eval_loss']:.3f}")
    bar.close()
    rows = [done[r.model.d_model] for r in rungs if r.model.d_model in done]
    if len(rows) >= 2:
        plot_sweep(rows, out / "sweep.png")
    return rows


def plot_sweep(rows: list[dict], path: pathlib.Path) -> pathlib.Path:
    """Eval loss against parameters and against training compute, log-log, each with its
    fitted power law and exponent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    loss = [r["eval_loss"] for r in rows]
    for ax, key, label in ((axes[0], "params", "parameters"),
                           (axes[1], "flops", "training compute (FLOPs)")):
        x = np.array([r[key] for r in rows], float)
        a, alpha = fit_power_law(x, loss)
        grid = np.geomspace(x.min() / 1.3, x.max() * 1.3, 50)
        ax.loglog(x, loss, "o", color="C0", label="validation loss")
        ax.loglog(grid, a * grid ** -alpha, "--", color="C1",
                  label=f"fit: {a:.3g} x {key}^-{alpha:.3f}")
        for r, xi, yi in zip(rows, x, loss):
            ax.annotate(f"d={r['width']}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set(xlabel=label, ylabel="validation loss (nats/token)")
        ax.legend()
    tokens = rows[0]["tokens"]
    fig.suptitle(f"bigger models do better: {len(rows)} widths, each trained on the same "
                 f"{tokens:,} tokens")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"--widths expects two or more positive integers, e.g. 32,64,128; "
                         f"got {text!r}")
    return widths
