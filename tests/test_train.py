"""Training end to end: learning, exact resume, accumulation, decay mask, config errors."""
import collections
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headwise import parallel
from headwise.model import ModelConfig, forward, init_params, param_axes
from headwise.model import params as params_module
from headwise.model.compiler import CPU_COMPILER_OPTIONS, compiler_options
from headwise.train import checkpoint
from headwise.train.config import MeshConfig, OptimConfig, load_config
from headwise.train.loop import train
from headwise.train.optim import decay_mask, learning_rate, make_optimizer
from headwise.train.layout import Layout, shard_state
from headwise.train.state import abstract_state, state_initializer
from headwise.train.step import init_state, loss_and_grads, make_eval_step, make_train_step
from tolerances import U, adam_first_step_gap, f32_error, gradient_gap, loss_gap

TINY = ["model.preset=tiny", "model.vocab_size=256", "model.context_length=32",
        "train.batch_size=8", "train.eval_steps=4", "train.sample_tokens=0", "optim.warmup_steps=10"]


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> str:
    """A small text with learnable structure: made-up words in a fixed grammar."""
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["mole", "shrew", "carbon", "biopsy", "tower", "eiffel", "head", "key", "query"]
    lines = [" ".join(rng.choice(words, 6)) + "." for _ in range(3000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


def _rows(run_dir, key):
    rows = [json.loads(l) for l in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_tiny_model_learns(corpus, tmp_path):
    cfg = load_config(None, TINY + [f"data.path={corpus}", "train.steps=200",
                                    "train.eval_every=100", "optim.lr=3e-3"])
    result = train(cfg, tmp_path / "run", progress=False)
    # Untrained: about ln(256) = 5.55 nats. The corpus's unigram entropy is about 2.8 nats;
    # the next letter of a known word is nearly certain, so a model that read the context
    # gets far below that.
    assert result["unigram_loss"] > 2.5
    assert result["eval_loss"] < result["unigram_loss"] - 1.0
    evals = _rows(tmp_path / "run", "eval_loss")
    assert list(evals) == [0, 100, 200] and evals[200] < evals[100] < evals[0]
    assert abs(evals[0] - np.log(256)) < 0.1  # untrained: about uniform over 256 bytes
    for name in ("config.toml", "loss.png", "tokenizer.json"):
        assert (tmp_path / "run" / name).is_file()


def test_resume_is_exact(corpus, tmp_path):
    cfg = load_config(None, TINY + [f"data.path={corpus}", "train.steps=16", "train.log_every=1",
                                    "train.eval_every=100", "train.checkpoint_every=100"])
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at=8)
    assert max(_rows(tmp_path / "resumed", "loss")) == 8
    train(cfg, tmp_path / "resumed", progress=False)
    straight, resumed = _rows(tmp_path / "straight", "loss"), _rows(tmp_path / "resumed", "loss")
    assert list(straight) == list(range(1, 17))
    assert resumed == straight  # bitwise: the floats are equal, not close
    p1, _ = checkpoint.load_model(tmp_path / "straight")
    p2, _ = checkpoint.load_model(tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_a_run_lays_out_its_state_once(corpus, tmp_path, monkeypatch):
    """The shape-first pattern, once per run, fresh or resumed: one eval_shape of the state, one
    tree of state shardings, and each divisibility rule checked once, when the run is resolved."""
    from headwise import parallel
    from headwise.parallel import checks
    from headwise.train import loop
    calls = collections.Counter()

    def count(module, name):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    count(loop, "abstract_state")
    count(parallel, "state_shardings")
    count(parallel, "param_shardings")
    for name in ("check_mesh_used", "check_params_divisible", "check_batch_divisible",
                 "check_processes"):
        count(checks, name)
    cfg = load_config(None, TINY + [f"data.path={corpus}", "train.steps=2", "train.eval_steps=1"])
    once = dict.fromkeys(["abstract_state", "state_shardings", "param_shardings", "check_mesh_used",
                          "check_params_divisible", "check_batch_divisible", "check_processes"], 1)
    train(cfg, tmp_path, progress=False, stop_at=1)
    assert calls == once
    calls.clear()
    assert train(cfg, tmp_path, progress=False)["start_step"] == 1  # resumed
    assert calls == once


def test_grad_accumulation_equals_one_batch():
    cfg = ModelConfig.preset("tiny", attention="fused")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = {k: jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 16)), jnp.int32)
             for k in ("inputs", "targets")}
    grads_of = jax.jit(loss_and_grads, static_argnums=(2, 3))  # eager: 6 s slower
    value1, grads1 = grads_of(params, batch, cfg, 1)
    value4, grads4 = grads_of(params, batch, cfg, 4)
    # One batch or four micro-batches: the same sums in other orders, so within f32_gap of each
    # other (tests/tolerances.py). The loss: twice its logits' gap, plus its logsumexps and mean
    # (3.5e-4; 5e-7 seen); dropping one micro-batch moves it 6e-3. Each gradient element:
    # the backward chain on its own Σ|terms| (1e-3 of the bound seen; dropping a micro-batch
    # moves every element by 900x to 3700x its bound).
    B, T = batch["targets"].shape
    max_logit = float(jnp.abs(forward(params, batch["inputs"], cfg)).max())
    np.testing.assert_allclose(value4, value1, rtol=0,
                               atol=loss_gap(cfg, T, B * T, max_logit, float(value1)))
    grad_gap = gradient_gap(params, batch["inputs"], batch["targets"], cfg)
    jax.tree.map(lambda a, b, gap: np.testing.assert_array_less(np.abs(a - b), gap + 1e-30),
                 grads4, grads1, grad_gap)
    # And through the optimizer: one updated state equals the other.
    optim = OptimConfig()
    opt = make_optimizer(optim, 10, param_axes(cfg))
    states = [make_train_step(cfg, opt, learning_rate(optim, 10), k)(
        init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(2)), batch)[0]
        for k in (1, 4)]
    # Adam's first step is lr·g/(|g| + eps): it keeps the gradients' agreement wherever g is
    # far from 0, and may differ by up to 2·lr where the gradient gap could flip g's sign.
    lr = float(learning_rate(optim, 10)(0))
    jax.tree.map(lambda a, b, g, gap, p: np.testing.assert_array_less(
        np.abs(a - b), adam_first_step_gap(g, gap, p, lr) + 1e-30),
        states[0]["params"], states[1]["params"], grads1, grad_gap, params)


def test_steps_compile_with_the_cpu_options_on_the_cpu_only():
    """The train and eval steps, the state's initializer and `init_params` called eagerly
    reach XLA with the CPU options of model/compiler.py (the compiled program carries them: a
    serialized executable holds its compile options), and only on the CPU."""
    cfg = ModelConfig.preset("tiny", context_length=8)
    optim = OptimConfig()
    opt = make_optimizer(optim, 10, param_axes(cfg))
    state = init_state(init_params(cfg, jax.random.key(0)), opt, jax.random.key(1))
    tokens = jnp.zeros((2, cfg.context_length), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens}
    layout = Layout(parallel.make_mesh(MeshConfig(), jax.devices()[:1]),
                    parallel.get_rules("dp"), "dp")
    shardings = shard_state(abstract_state(cfg, opt), cfg, layout)

    def options_in(jitted, *args) -> set:
        serialized = jitted.lower(*args).compile().runtime_executable().serialize()
        return {name for name in CPU_COMPILER_OPTIONS if name.encode() in serialized}

    schedule, wanted = learning_rate(optim, 10), set(CPU_COMPILER_OPTIONS)
    assert wanted and jax.default_backend() == "cpu"
    assert options_in(make_train_step(cfg, opt, schedule), state, batch) == wanted
    assert options_in(make_eval_step(cfg, shardings), state["params"], batch) == wanted
    assert options_in(state_initializer(cfg, opt, shardings.state), jax.random.key(0)) == wanted
    assert options_in(params_module._init_program("cpu"), cfg, jax.random.key(0)) == wanted
    # Asked for other options (tests ask for faster compiles), a step gets those instead.
    assert not options_in(make_train_step(cfg, opt, schedule, compiler_options={}), state, batch)
    assert compiler_options("gpu") == compiler_options("tpu") == {}


def test_weight_decay_mask_is_exactly_the_matrices():
    cfg = ModelConfig.preset("tiny", bias=True, tie_embeddings=False, activation="swiglu")
    mask = decay_mask(param_axes(cfg))
    decayed = {"/".join(str(k.key) for k in path) for path, m in
               jax.tree_util.tree_flatten_with_path(mask)[0] if m}
    assert decayed == {"embed/token", "embed/position", "unembed",
                       "blocks/attention/query", "blocks/attention/key",
                       "blocks/attention/value_down", "blocks/attention/value_up",
                       "blocks/mlp/up", "blocks/mlp/gate", "blocks/mlp/down"}


def test_decay_applies_only_where_masked():
    """With zero gradients, AdamW's update is -lr * wd * param where decayed, 0 elsewhere."""
    cfg = ModelConfig.preset("tiny")
    params = jax.tree.map(jnp.ones_like, init_params(cfg, jax.random.key(0)))
    optim = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
    opt = make_optimizer(optim, 10, param_axes(cfg))
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    mask = decay_mask(param_axes(cfg))
    # Decayed: lr (the schedule's few float32 roundings of 0.1) times wd and param (exact
    # halving and 1): within 8u relative of -0.05. Elsewhere Adam's 0 / (0 + eps): exactly 0.
    jax.tree.map(lambda u, m: np.testing.assert_allclose(u, -0.05 if m else 0.0,
                                                         rtol=f32_error(8, 1.0)), updates, mask)


@pytest.mark.parametrize("override, match", [
    (["train.stepz=3"], "unknown key train.stepz"),
    (["train.steps=1.5"], "train.steps must be int"),
    (["train.steps=0"], "train.steps must be > 0"),
    (["optim.beta2=1.5"], "optim.beta2"),
    (["model.attention=flash"], "attention"),
    (["model.preset=gpt5"], "unknown model preset"),
    (["train.batch_size=6", "train.grad_accum=4"], "train.grad_accum"),
    (["nope.x=1"], "unknown section"),
    (["optim.lr=1e-3", "optim.min_lr=1e-2"], "optim.min_lr"),
    (["mesh.rules=[['batch', 'data']]", "mesh.strategy='dp'"], "mesh.rules"),
    (["mesh.rules=[['batch', 'gpu']]"], "mesh.rules"),
    (["mesh.strategy='zero3'"], "unknown mesh.strategy"),
    (["train.steps"], "section.key=value"),
])
def test_bad_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


def test_bad_data_raises_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="data.path"):
        train(load_config(None, TINY + ["data.path=/no/such/file.txt"]), tmp_path / "a", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("too short for one context")
    with pytest.raises(ValueError, match="context_length"):
        train(load_config(None, TINY + [f"data.path={short}"]), tmp_path / "b", progress=False)
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 500)
    with pytest.raises(ValueError, match="model.vocab_size"):
        train(load_config(None, TINY + [f"data.path={text}", "model.vocab_size=100"]),
              tmp_path / "c", progress=False)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layers = 3\n[train]\nsteps = 7\n')
    cfg = load_config(str(path), ["train.steps=9", "optim.lr=1e-3"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.steps, cfg.optim.lr) == (3, 24, 9, 1e-3)
    with pytest.raises(FileNotFoundError, match="--config"):
        load_config("no-such-config")


def _event_scalars(folder: pathlib.Path) -> dict:
    """(tag, step) -> value from TensorBoard event files: TFRecord framing around Event protos."""
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            n = int.from_bytes(data[:8], "little")
            event = Event.FromString(data[12:12 + n])
            data = data[16 + n:]
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = v.simple_value
    return scalars


def test_tensorboard_events_match_metrics(corpus, tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = load_config(None, TINY + [f"data.path={corpus}", "train.steps=4", "train.log_every=2",
                                    "train.eval_every=4", "train.eval_steps=1"])
    train(cfg, tmp_path, progress=False)
    scalars = _event_scalars(tmp_path / "tensorboard")
    for step, value in _rows(tmp_path, "loss").items():
        # The same number, stored as float32 by TensorBoard: one rounding, at most u relative.
        assert scalars[("loss", step)] == pytest.approx(value, rel=U)
    assert ("eval_loss", 4) in scalars


def test_cli_resumes_with_the_runs_own_config(corpus, tmp_path, capsys):
    from headwise.train.cli import main
    run = str(tmp_path / "run")
    assert main(["train", "--run-dir", run, "--set", *TINY, f"data.path={corpus}",
                 "train.steps=4", "train.eval_every=4", "train.eval_steps=1"]) == 0
    # Again, asking only for more steps: the model, data and the rest come from run/config.toml.
    assert main(["train", "--run-dir", run, "--set", "train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "after 6 steps" in out
    assert list(_rows(run, "loss")) == [4, 6]  # logged at the end of each run
    assert load_config(f"{run}/config.toml").model.d_model == 24


@pytest.mark.parametrize("kwargs, env, match", [
    (dict(num_processes=2), {}, "--process-id"),
    (dict(coordinator="localhost:1"), {}, "--num-processes"),
    (dict(coordinator="localhost:1", num_processes=2, process_id=2), {}, r"\[0, 2\)"),
    (dict(auto=True), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
])
def test_bad_multi_host_settings_raise(kwargs, env, match, monkeypatch):
    from headwise.parallel.launch import start_distributed
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        start_distributed(**kwargs)


def test_ctrl_c_saves_and_stops_cleanly(corpus, tmp_path):
    """SIGINT mid-run: the step in flight finishes, a checkpoint is written, the exit is clean."""
    import os
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwise.train.cli", "train", "--devices", "1", "--run-dir", str(run),
         "--set", *TINY, f"data.path={corpus}", "train.steps=100000", "train.log_every=1",
         "train.eval_every=100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "stopped at step" in out
    last = max(_rows(run, "loss"))
    assert 3 <= last < 100000
    manager = checkpoint.open_manager(run)
    assert checkpoint.latest_step(manager) == last
    manager.close()


def test_a_closed_pipe_is_not_an_error():
    """`headwise params | head`: the reader stops early; no traceback, exit 0."""
    import subprocess
    import sys
    run = subprocess.Popen([sys.executable, "-m", "headwise", "params", "--preset", "gpt3-175b"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.close()  # before anything is read
    err = run.stderr.read().decode()
    assert run.wait() == 0 and "Traceback" not in err, err
