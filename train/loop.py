"""The training loop: data, state (fresh or resumed), steps, evals, logs, checkpoints, a sample."""
import json
import pathlib
import signal
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from headwise import parallel
from headwise.model import flops_per_token, init_params, param_axes
from headwise.model.decode import generate_stream_sliding

from . import checkpoint
from .config import RunConfig, to_dict, write_config
from .data import Dataset, check_fits, get_batch, load_dataset
from .optim import learning_rate, make_optimizer
from .step import init_state

# Dense bf16 peak FLOP/s per chip, for MFU when train.peak_flops is 0.
_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5 lite": 197e12, "v5e": 197e12,
               "v6 lite": 918e12, "v5p": 459e12, "v5": 459e12, "v4": 275e12, "cpu": 1e11}


def peak_flops(cfg: RunConfig) -> float:
    """Per-device peak FLOP/s: the configured one, else a table lookup by device kind."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in _PEAK_FLOPS.items() if k in kind), _PEAK_FLOPS["cpu"])


def unigram_loss(tokens: np.ndarray, vocab_size: int, most: int = 1 << 24) -> float:
    """Entropy (nats/token) of the token frequencies: what a model that ignores context gets.
    Counted over at most `most` evenly spaced tokens, so a corpus of billions starts quickly."""
    sample = np.asarray(tokens[::max(1, len(tokens) // most)])
    counts = np.bincount(sample, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _global_batch(tokens, cfg: RunConfig, step: int, seed: int, mesh, rules) -> dict:
    """This process's rows of the global batch for `step`, as one sharded jax.Array each."""
    inputs, targets = get_batch(tokens, seed=seed, step=step, batch_size=cfg.train.batch_size,
                                context_length=cfg.model.context_length,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    return parallel.shard_batch({"inputs": inputs, "targets": targets}, mesh, rules)


def evaluate(eval_step, params, data: Dataset, cfg: RunConfig, mesh, rules) -> float:
    """Mean loss over the same `eval_steps` validation batches every time."""
    losses = [eval_step(params, _global_batch(data.val, cfg, i, cfg.train.seed + 1, mesh, rules))
              for i in range(cfg.train.eval_steps)]
    return float(np.mean(jax.device_get(losses))) if losses else float("nan")


def _tensorboard(run_dir: pathlib.Path):
    """A TensorBoard event writer in run_dir/tensorboard when tensorboardX is installed
    (`pip install headwise[tensorboard]`), else None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir=str(run_dir / "tensorboard"))


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
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            self.rows = [r for r in map(json.loads, lines) if r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            self.events = _tensorboard(run_dir)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.events is not None:
            for name, value in row.items():
                if name != "step":
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
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        for points, label in ((train, "train"), (evals, "validation")):
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
        if self.baseline is not None:
            ax.axhline(self.baseline, color="gray", linestyle="--", label="unigram baseline")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="headwise training")
        ax.legend()
        fig.savefig(self.plot, dpi=100, bbox_inches="tight")
        plt.close(fig)


def initial_state(cfg: RunConfig, optimizer, mesh, rules, manager):
    """The newest checkpoint, restored straight into this mesh's shardings (whatever mesh saved
    it), or a fresh state born sharded."""
    shardings = parallel.state_shardings(cfg.model, optimizer, mesh, rules)
    key, init_key = jax.random.split(jax.random.key(cfg.train.seed))
    if checkpoint.latest_step(manager) is not None:
        shapes = jax.eval_shape(lambda k: init_state(init_params(cfg.model, k), optimizer, k), key)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, shardings)
        return checkpoint.restore(manager, target)[0]
    params = parallel.init_sharded(cfg.model, init_key, mesh, rules)
    return parallel.init_sharded_state(cfg.model, params, optimizer, key, mesh, rules)


def prepare(cfg: RunConfig, run_dir: pathlib.Path):
    """Everything before the first step, each mistake caught before anything compiles."""
    data = load_dataset(cfg.data, vocab_size=cfg.model.vocab_size)
    if data.tokenizer is not None and data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but "
                         f"model.vocab_size is {cfg.model.vocab_size}: set "
                         f"--set model.vocab_size={data.tokenizer.vocab_size}")
    check_fits(data, cfg.model.context_length)
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_config(cfg, run_dir / "config.toml")
    if data.tokenizer is not None and jax.process_index() == 0:
        (run_dir / "tokenizer.json").write_text(data.tokenizer.to_json())
    return data


class Speedometer:
    """Tokens/s and MFU between two log points, leaving out compilation and evaluation."""

    def __init__(self, tokens_per_step: int, peak_fraction_per_step: float, step: int):
        self.tokens, self.flops = tokens_per_step, peak_fraction_per_step
        self.restart(step)

    def restart(self, step: int) -> None:
        self.clock, self.step = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        self.clock += seconds

    def read(self, step: int) -> dict:
        seconds, n = time.perf_counter() - self.clock, step - self.step
        self.restart(step)
        return {"tokens_per_s": self.tokens * n / seconds, "mfu": self.flops * n / seconds}


class StopRequest:
    """Ctrl-C or SIGTERM (a pre-empted job) asks the loop to stop after the current step, save
    and return, rather than dying mid-step. One process only: in a multi-process run each
    process would stop at a different step, so there the signals keep their usual meaning."""

    def __init__(self):
        self.requested, self.previous = False, {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame):
        if self.requested:  # asked twice: stop now
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, run_dir, *, progress: bool = True, stop_at: int | None = None,
          devices=None) -> dict:
    """Train (or resume) a run in `run_dir`: a summary of the final evaluation, the params and
    the data. `stop_at` ends early with a checkpoint, as a pre-empted job would; `devices`
    (default: all) are the ones the mesh is made of."""
    run_dir = pathlib.Path(run_dir).absolute()
    t, steps = cfg.train, cfg.train.steps
    mesh = parallel.make_mesh(cfg.mesh, devices)
    rules, strategy = parallel.resolve(cfg.mesh, mesh)
    parallel.check_divisible(cfg.model, mesh, rules, t.batch_size, t.grad_accum)
    data = prepare(cfg, run_dir)
    lead = jax.process_index() == 0  # only the first process prints and writes logs
    say = tqdm.write if progress and lead else (lambda s: None)
    say(f"data: {data.description}; corpus hash {data.corpus_hash}")
    say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es), strategy {strategy}")
    optimizer = make_optimizer(cfg.optim, steps, param_axes(cfg.model))
    train_step = parallel.make_sharded_train_step(
        cfg.model, optimizer, learning_rate(cfg.optim, steps), mesh, rules, t.grad_accum)
    eval_step = parallel.make_sharded_eval_step(cfg.model, mesh, rules)
    manager = checkpoint.open_manager(run_dir, keep=t.keep_checkpoints)
    state = initial_state(cfg, optimizer, mesh, rules, manager)
    start = int(state["step"])
    if start:
        say(f"resumed from step {start} in {run_dir}")
    summary = {"unigram_loss": unigram_loss(data.train, data.vocab_size), "start_step": start}
    log = MetricsLog(run_dir, start, enabled=lead, baseline=summary["unigram_loss"])

    def run_eval(step: int) -> float:
        value = evaluate(eval_step, state["params"], data, cfg, mesh, rules)
        log.write({"step": step, "eval_loss": value})
        log.draw()
        say(f"step {step}: validation loss {value:.4f} "
            f"(unigram baseline {summary['unigram_loss']:.4f})")
        return value

    if start == 0:
        summary["initial_eval_loss"] = run_eval(0)
    tokens_per_step = t.batch_size * cfg.model.context_length
    speed = Speedometer(tokens_per_step, flops_per_token(cfg.model) * tokens_per_step
                        / (peak_flops(cfg) * mesh.size), start)
    last = steps if stop_at is None else min(stop_at, steps)
    bar = tqdm(range(start, last), initial=start, total=steps, disable=not (progress and lead),
               desc="train", unit="step", dynamic_ncols=True)
    stop = StopRequest()
    try:
        for step in bar:
            batch = _global_batch(data.train, cfg, step, t.seed, mesh, rules)
            state, metrics = train_step(state, batch)
            done = step + 1
            if step == start:  # leave compilation out of tokens/s
                jax.block_until_ready(metrics)
                speed.restart(done)
            if done % t.log_every == 0 or done == steps:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()} | speed.read(done)
                log.write({"step": done, **row})
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            if done % t.eval_every == 0 or done == steps:
                started = time.perf_counter()
                summary["eval_loss"] = run_eval(done)
                speed.exclude(time.perf_counter() - started)
            if done % t.checkpoint_every == 0 or done == last or stop.requested:
                checkpoint.save(manager, done, state, to_dict(cfg))
            if stop.requested:
                say(f"stopped at step {done}, checkpoint saved: run again with the same --run-dir "
                    f"to resume")
                break
    finally:
        stop.restore()
    bar.close()
    if "eval_loss" not in summary:  # stopped early, or the run had already finished
        summary["eval_loss"] = evaluate(eval_step, state["params"], data, cfg, mesh, rules)
    log.close()
    manager.wait_until_finished()
    manager.close()
    summary.update(step=int(state["step"]), params=state["params"], data=data)
    return summary


def sample_text(params, cfg: RunConfig, data: Dataset, prompt: str, n_tokens: int, seed: int = 0,
                **sampling) -> str:
    """Decode a sample from the model, prompt included."""
    ids = data.tokenizer.encode(prompt)
    new = list(generate_stream_sliding(params, cfg.model, ids, n_tokens, key=jax.random.key(seed),
                                       **sampling))
    return data.tokenizer.decode(ids + new)
