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
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from headwise import parallel
from headwise.model import flops_per_token, param_axes
from headwise.model.decode import generate_stream_sliding

from . import checkpoint, integrity, numbers
from .config import RunConfig, config_text, to_dict
from .data import Dataset, check_fits, get_batch, load_dataset
from .faults import NonFiniteSteps, exit_for_lost_peer, writable_folder, write_whole
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
    bad: NonFiniteSteps  # steps skipped for a non-finite loss or gradient norm


def train(cfg: RunConfig, run_dir, *, progress: bool = True, stop_at: int | None = None,
          devices=None, profile: tuple[int, int] | None = None) -> dict:
    """Train (or resume) a run in `run_dir`: a summary of the final evaluation, the params and
    the data. `stop_at` ends early with a checkpoint, as a pre-empted job would; `devices`
    (default: all) are the ones the mesh is made of; `profile` = (start, stop) traces those
    steps into run_dir/profile."""
    run_dir = writable_folder(pathlib.Path(run_dir).absolute(), "--run-dir")
    layout = resolve_run(cfg, devices)  # mesh, rules and every divisibility check
    data = load_data(cfg, run_dir)
    run = Run(cfg, run_dir, layout, data, build_program(cfg, layout),
              show=progress and jax.process_index() == 0)
    announce(run)
    with checkpoint.open_manager(run_dir, keep=cfg.train.keep_checkpoints) as manager:
        state = restore_or_create(cfg.model, run.program.optimizer, cfg.train.seed,
                                  run.program.shardings, manager, fingerprint=fingerprint(run),
                                  say=run.say)
        write_run_files(run)  # after the checkpoint was found to fit: a refusal changes nothing
        out = open_outputs(run, state, manager, StepProfiler(profile, run_dir / "profile"))
        try:
            state = run_steps(run, state, out, stop_at)
        except jax.errors.JaxRuntimeError as error:
            if jax.process_count() > 1:  # a peer died: nothing here can finish
                exit_for_lost_peer(error, jax.process_index())
            raise
        return finish(run, state, out)  # closing the manager lets pending saves land


def announce(run: Run) -> None:
    """The data and the mesh, in a line each."""
    data, mesh = run.data, run.layout.mesh
    run.say(f"data: {data.description}; corpus hash {data.corpus_hash}")
    run.say(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} "
            f"device(s), {jax.process_count()} process(es), strategy {run.layout.strategy}")


def load_data(cfg: RunConfig, run_dir: pathlib.Path) -> Dataset | numbers.NumbersData:
    """The dataset (or a generated task), checked against the model."""
    if cfg.data.task == numbers.TASK:
        numbers.check_model(cfg.model)
        return numbers.NumbersData()
    data = load_dataset(cfg.data, vocab_size=cfg.model.vocab_size)
    if data.tokenizer is not None and data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but "
                         f"model.vocab_size is {cfg.model.vocab_size}: set "
                         f"--set model.vocab_size={data.tokenizer.vocab_size}")
    check_fits(data, cfg.model.context_length)
    return data


def write_run_files(run: Run) -> None:
    """The run's config.toml and tokenizer.json, each written whole or not at all."""
    if jax.process_index() == 0:
        write_whole(run.run_dir / "config.toml", config_text(run.cfg))
        if run.data.tokenizer is not None:
            write_whole(run.run_dir / "tokenizer.json", run.data.tokenizer.to_json())


def fingerprint(run: Run) -> dict:
    return integrity.fingerprint(run.cfg.model, run.data.tokenizer)


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
    out = Outputs(log, manager, _speedometer(run, start), summary, profiler,
                  NonFiniteSteps(run.cfg.train.max_bad_steps))
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
            done = step + 1
            stopping = stop.reached(done)  # read once: a stop is always saved
            out.bad.add(done, metrics["skipped"])  # reads the previous step's flag
            if step == start:  # leave compilation out of tokens/s
                jax.block_until_ready(metrics)
                out.speed.restart(done)
            if done % t.log_every == 0 or done == t.steps:
                row = log_step(out, done, metrics)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            if done % t.eval_every == 0 or done == t.steps:
                with out.speed.paused():
                    out.summary["eval_loss"] = log_eval(run, state["params"], out, done)
            due = done % t.checkpoint_every == 0 or done == last or stopping
            if due:
                out.bad.settle()  # this step's own flag, read now: the save waits anyway
            if due and not out.bad.in_a_row:  # a state after a skipped step is not saved
                checkpoint.save(out.manager, done, state, to_dict(run.cfg),
                                fingerprint=fingerprint(run))
            for began in out.bad.take_streaks():
                run.say(f"step {began}: loss or gradient norm not finite; update skipped")
            out.bad.check(lambda: checkpoint.latest_step(out.manager))
            if stopping:
                run.say(f"stopped at step {done}, checkpoint saved: run again with the same "
                        f"--run-dir to resume")
                break
    bar.close()
    out.profiler.close()
    if out.profiler.traced:  # compiled already: this only looks it up
        out.profiler.keep_program(run.program.train_step.lower(state, batch).compile())
    return state


def log_step(out: Outputs, done: int, metrics: dict) -> dict:
    """The step's metrics and the speed since the last row, as a metrics.jsonl row."""
    row = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "skipped"}
    row |= out.speed.read(done) | {"skipped_steps": out.bad.take_since_row()}
    out.log.write({"step": done, **row})
    return row


def finish(run: Run, state: dict, out: Outputs) -> dict:
    """Evaluate if the loop did not end on an eval, let pending saves land, and sum up."""
    if "eval_loss" not in out.summary:  # stopped early, or the run had already finished
        out.summary["eval_loss"] = evaluate(run, state["params"])
    out.summary["skipped_steps"] = out.bad.total
    out.log.close()
    out.manager.wait_until_finished()
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
    and return, rather than dying mid-step. In a multi-process run SIGTERM to any process is
    caught by JAX's preemption notifier, and the processes agree on the step to stop at
    (`reached_preemption_sync_point`), so they all save the same one; Ctrl-C keeps its usual
    meaning there."""

    def __init__(self):
        self.requested, self.previous = False, {}
        self.shared = jax.process_count() > 1
        if not self.shared and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def reached(self, step: int) -> bool:
        """Whether to stop after `step`; every process calls it at every step."""
        if self.shared:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

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
