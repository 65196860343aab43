"""The training loop: resolve the run, load its data, build its state, step, finish."""
import dataclasses
import pathlib
import signal
import threading
from typing import Callable

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from headwise import parallel
from headwise.model import flops_per_token, param_axes
from headwise.model.decode import generate_stream_sliding

from . import checkpoint, numbers
from .config import RunConfig, to_dict, write_config
from .data import Dataset, check_fits, get_batch, load_dataset
from .layout import Layout, StateShardings, resolve_run, shard_state
from .metrics import MetricsLog, Speedometer, peak_flops, unigram_loss
from .optim import learning_rate, make_optimizer
from .profile import StepProfiler
from .state import abstract_state, restore_or_create
from .step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Program:
    """The optimizer, the train state's shardings and the jitted steps: built once per run."""

    optimizer: optax.GradientTransformation
    shardings: StateShardings
    train_step: Callable
    eval_step: Callable


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run fixes before its first step, passed down to every stage."""

    cfg: RunConfig
    run_dir: pathlib.Path
    layout: Layout
    data: Dataset
    program: Program
    show: bool  # this process prints progress (only the first one ever does)

    def say(self, line: str) -> None:
        if self.show:
            tqdm.write(line)


@dataclasses.dataclass
class Outputs:
    """Where a run writes as it goes: metrics, checkpoints, and the summary `train` returns."""

    log: MetricsLog
    manager: ocp.CheckpointManager
    speed: Speedometer  # tokens/s and MFU between two log rows
    summary: dict
    profiler: StepProfiler  # a jax.profiler trace of the steps asked for, if any


def train(cfg: RunConfig, run_dir, *, progress: bool = True, stop_at: int | None = None,
          devices=None, profile: tuple[int, int] | None = None) -> dict:
    """Train (or resume) a run in `run_dir`: a summary of the final evaluation, the params and
    the data. `stop_at` ends early with a checkpoint, as a pre-empted job would; `devices`
    (default: all) are the ones the mesh is made of; `profile` = (start, stop) traces those
    steps into run_dir/profile."""
    run_dir = pathlib.Path(run_dir).absolute()
    layout = resolve_run(cfg, devices)  # mesh, rules and every divisibility check
    data = load_data(cfg, run_dir)
    run = Run(cfg, run_dir, layout, data, build_program(cfg, layout),
              show=progress and jax.process_index() == 0)
    announce(run)
    manager = checkpoint.open_manager(run_dir, keep=cfg.train.keep_checkpoints)
    state = restore_or_create(cfg.model, run.program.optimizer, cfg.train.seed,
                              run.program.shardings, manager)
    out = open_outputs(run, state, manager, StepProfiler(profile, run_dir / "profile"))
    state = run_steps(run, state, out, stop_at)
    return finish(run, state, out)


def announce(run: Run) -> None:
    """The data and the mesh, in a line each."""
    data, mesh = run.data, run.layout.mesh
    run.say(f"data: {data.description}; corpus hash {data.corpus_hash}")
    run.say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} "
            f"device(s), {jax.process_count()} process(es), strategy {run.layout.strategy}")


def load_data(cfg: RunConfig, run_dir: pathlib.Path) -> Dataset | numbers.NumbersData:
    """The dataset (or a generated task), checked against the model; the run folder with its
    config and tokenizer."""
    if cfg.data.task == numbers.TASK:
        numbers.check_model(cfg.model)
        run_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            write_config(cfg, run_dir / "config.toml")
        return numbers.NumbersData()
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


def build_program(cfg: RunConfig, layout: Layout) -> Program:
    """The shape-first pattern, once: the state's shapes (eval_shape), their shardings, and the
    train and eval steps jitted with those shardings."""
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, param_axes(cfg.model))
    shardings = shard_state(abstract_state(cfg.model, optimizer), cfg.model, layout)
    schedule = learning_rate(cfg.optim, cfg.train.steps)
    return Program(optimizer, shardings,
                   make_train_step(cfg.model, optimizer, schedule, cfg.train.grad_accum, shardings),
                   make_eval_step(cfg.model, shardings))


def open_outputs(run: Run, state: dict, manager: ocp.CheckpointManager,
                 profiler: StepProfiler) -> Outputs:
    """The metrics log (cut back to the state's step) and the summary; a fresh run is evaluated
    before its first step."""
    start = int(state["step"])
    if start:
        run.say(f"resumed from step {start} in {run.run_dir}")
    baseline = (run.data.baseline() if isinstance(run.data, numbers.NumbersData)
                else unigram_loss(run.data.train, run.data.vocab_size))
    summary = {"unigram_loss": baseline, "start_step": start}
    log = MetricsLog(run.run_dir, start, enabled=jax.process_index() == 0, baseline=baseline)
    out = Outputs(log, manager, _speedometer(run, start), summary, profiler)
    if start == 0:
        summary["initial_eval_loss"] = log_eval(run, state["params"], out, 0)
    return out


def run_steps(run: Run, state: dict, out: Outputs, stop_at: int | None) -> dict:
    """Train from the state's step to `stop_at` (default: the end), logging, evaluating and
    saving as the config says; Ctrl-C or SIGTERM stops after the step in flight, saved."""
    t, start = run.cfg.train, int(state["step"])
    last = t.steps if stop_at is None else min(stop_at, t.steps)
    bar = tqdm(range(start, last), initial=start, total=t.steps, disable=not run.show,
               desc="train", unit="step", dynamic_ncols=True)
    with StopRequest() as stop:
        for step in bar:
            out.profiler.begin(step)
            batch = global_batch(run, run.data.train, step, t.seed)
            state, metrics = run.program.train_step(state, batch)
            out.profiler.end(step, metrics)
            done, stopping = step + 1, stop.requested  # read once: a stop is always saved
            if step == start:  # leave compilation out of tokens/s
                jax.block_until_ready(metrics)
                out.speed.restart(done)
            if done % t.log_every == 0 or done == t.steps:
                row = log_step(out, done, metrics)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            if done % t.eval_every == 0 or done == t.steps:
                with out.speed.paused():
                    out.summary["eval_loss"] = log_eval(run, state["params"], out, done)
            if done % t.checkpoint_every == 0 or done == last or stopping:
                checkpoint.save(out.manager, done, state, to_dict(run.cfg))
            if stopping:
                run.say(f"stopped at step {done}, checkpoint saved: run again with the same "
                        f"--run-dir to resume")
                break
    bar.close()
    out.profiler.close()
    return state


def log_step(out: Outputs, done: int, metrics: dict) -> dict:
    """The step's metrics and the speed since the last row, as a metrics.jsonl row."""
    row = {k: float(v) for k, v in jax.device_get(metrics).items()} | out.speed.read(done)
    out.log.write({"step": done, **row})
    return row


def finish(run: Run, state: dict, out: Outputs) -> dict:
    """Evaluate if the loop did not end on an eval, let pending saves land, and sum up."""
    if "eval_loss" not in out.summary:  # stopped early, or the run had already finished
        out.summary["eval_loss"] = evaluate(run, state["params"])
    out.log.close()
    out.manager.wait_until_finished()
    out.manager.close()
    return out.summary | dict(step=int(state["step"]), params=state["params"], data=run.data)


def _speedometer(run: Run, start: int) -> Speedometer:
    tokens_per_step = run.cfg.train.batch_size * run.cfg.model.context_length
    peak_seconds = (flops_per_token(run.cfg.model) * tokens_per_step
                    / (peak_flops(run.cfg) * run.layout.mesh.size))
    return Speedometer(tokens_per_step, peak_seconds, start)


def global_batch(run: Run, tokens, step: int, seed: int) -> dict:
    """This process's rows of the global batch for `step`, as one sharded jax.Array each.
    `tokens`: a split's tokens (or, for a generated task, the split's name)."""
    rows = dict(seed=seed, step=step, batch_size=run.cfg.train.batch_size,
                process_index=jax.process_index(), process_count=jax.process_count())
    if isinstance(run.data, numbers.NumbersData):
        return parallel.shard_batch(run.data.batch(tokens, **rows), run.program.shardings.batch)
    inputs, targets = get_batch(tokens, context_length=run.cfg.model.context_length, **rows)
    return parallel.shard_batch({"inputs": inputs, "targets": targets},
                                run.program.shardings.batch)


def evaluate(run: Run, params) -> float:
    """Mean loss over the same `eval_steps` validation batches every time."""
    t = run.cfg.train
    losses = [run.program.eval_step(params, global_batch(run, run.data.val, i, t.seed + 1))
              for i in range(t.eval_steps)]
    return float(np.mean(jax.device_get(losses))) if losses else float("nan")


def log_eval(run: Run, params, out: Outputs, step: int) -> float:
    """`evaluate`, written to the metrics and shown against the unigram baseline."""
    value = evaluate(run, params)
    row = {"step": step, "eval_loss": value}
    if isinstance(run.data, numbers.NumbersData):  # exact match on the held-out numbers
        row["eval_accuracy"] = out.summary["eval_accuracy"] = run.data.accuracy(
            params, run.cfg.model)
    out.log.write(row)
    out.log.draw()
    accuracy = f", held-out exact match {row['eval_accuracy']:.1%}" if len(row) > 2 else ""
    run.say(f"step {step}: validation loss {value:.4f} "
            f"(unigram baseline {out.summary['unigram_loss']:.4f}){accuracy}")
    return value


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

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def sample_text(params, cfg: RunConfig, data: Dataset, prompt: str, n_tokens: int, seed: int = 0,
                **sampling) -> str:
    """Decode a sample from the model, prompt included."""
    ids = data.tokenizer.encode(prompt)
    new = list(generate_stream_sliding(params, cfg.model, ids, n_tokens, key=jax.random.key(seed),
                                       **sampling))
    return data.tokenizer.decode(ids + new)
