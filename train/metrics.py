"""What a run reports as it goes: metrics.jsonl, loss.png, TensorBoard events, tokens/s and MFU."""
import contextlib
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

from headwise.parallel.hardware import HARDWARE

from .config import RunConfig
from .faults import finite_or_none, write_whole

# jax's device_kind (lower case) -> the hardware table's entry (headwise.parallel.hardware,
# each figure with its source), for MFU when train.peak_flops is 0. First match wins.
_KINDS = {"h100": "h100", "h200": "h200", "a100": "a100", "v5 lite": "tpu-v5e", "v5e": "tpu-v5e",
          "v6 lite": "tpu-v6e", "v6e": "tpu-v6e", "v5p": "tpu-v5p", "v5": "tpu-v5p",
          "v4": "tpu-v4"}


def peak_flops(cfg: RunConfig) -> float:
    """Per-device peak FLOP/s: the configured one, else the hardware table's for the device
    kind (this machine's measured CPU figure for anything it does not know)."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind.lower()
    return HARDWARE[next((v for k, v in _KINDS.items() if k in kind), "cpu")].peak_flops


def unigram_loss(tokens: np.ndarray, vocab_size: int, most: int = 1 << 24) -> float:
    """Entropy (nats/token) of the token frequencies: what a model that ignores context gets.
    Counted over at most `most` evenly spaced tokens, so a corpus of billions starts quickly."""
    sample = np.asarray(tokens[::max(1, len(tokens) // most)])
    counts = np.bincount(sample, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tensorboard(run_dir: pathlib.Path):
    """A TensorBoard event writer in run_dir/tensorboard when tensorboardX is installed
    (`pip install headwise[tensorboard]`), else None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir=str(run_dir / "tensorboard"))


def _json_line(row: dict) -> str:
    """One row of strict JSON (non-finite values as null, so every JSON reader takes it)."""
    return json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n"


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a JSON row (what a crash in the middle
    of a write leaves) is dropped with a warning, so the run can go on."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError:
            print(f"headwise: warning: {path} line {number} is not a whole JSON row (a write "
                  f"cut short by a crash?); dropped it", file=sys.stderr)
            continue
        rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl (one object per row), loss.png and TensorBoard events, in the run dir. Rows
    past the step a run resumes from (written after its last checkpoint) are dropped, so the log
    matches the state."""

    def __init__(self, run_dir: pathlib.Path, start_step: int, enabled: bool = True,
                 baseline: float | None = None):
        self.path, self.plot, self.enabled = run_dir / "metrics.jsonl", run_dir / "loss.png", enabled
        self.baseline = baseline
        self.rows, self.events = [], None
        if enabled:  # other processes neither read nor write it
            # A fresh run (start_step 0) starts an empty log: no rows of an earlier try.
            self.rows = [r for r in read_rows(self.path) if r["step"] <= start_step
                         ] if start_step else []
            write_whole(self.path, "".join(_json_line(r) for r in self.rows))
            self.events = _tensorboard(run_dir)

    def write(self, row: dict) -> None:
        row = {name: finite_or_none(value) for name, value in row.items()}
        self.rows.append(row)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(_json_line(row))
        if self.events is not None:
            for name, value in row.items():
                if name != "step" and value is not None:
                    self.events.add_scalar(name, value, row["step"])

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

    def draw(self) -> None:
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if r.get("eval_loss") is not None]
        for points, label in ((train, "train"), (evals, "validation")):
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
        if self.baseline is not None:
            ax.axhline(self.baseline, color="gray", linestyle="--", label="unigram baseline")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="headwise training")
        ax.legend()
        partial = self.plot.with_name(f".{self.plot.name}.partial.png")
        fig.savefig(partial, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(partial, self.plot)  # a crash mid-draw leaves the previous picture


class Speedometer:
    """Tokens/s and MFU between two log points, leaving out compilation and evaluation.
    `peak_seconds_per_step`: the seconds one step would take at the devices' peak FLOP/s."""

    def __init__(self, tokens_per_step: int, peak_seconds_per_step: float, step: int):
        self.tokens_per_step, self.peak_seconds_per_step = tokens_per_step, peak_seconds_per_step
        self.restart(step)

    def restart(self, step: int) -> None:
        self.clock, self.step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (evaluations) out of the next reading."""
        started = time.perf_counter()
        yield
        self.clock += time.perf_counter() - started

    def read(self, step: int) -> dict:
        seconds, n = time.perf_counter() - self.clock, step - self.step
        self.restart(step)
        return {"tokens_per_s": self.tokens_per_step * n / seconds,
                "mfu": self.peak_seconds_per_step * n / seconds}
