"""The trainer on meshes: every strategy against one device, the CLI, restore onto another
mesh, and two real processes talking through gloo."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from headwise.train import checkpoint
from headwise.train.config import load_config
from headwise.train.loop import train
from tolerances import loss_gap

# Dims divisible by every mesh axis below (vocab 256 by tensor=4, batch 16 by data*fsdp=8).
SETUP = ["model.preset=tiny", "model.vocab_size=256", "model.n_heads=4", "model.d_model=32",
         "model.d_mlp=64", "model.context_length=32", "model.attention='fused'",
         "train.batch_size=16", "train.steps=4", "train.log_every=1", "train.eval_every=4",
         "train.eval_steps=2", "train.checkpoint_every=2", "train.sample_tokens=0"]
MESHES = {"dp8": ("data=8", "dp"), "fsdp8": ("fsdp=8", "fsdp"), "dp2xtp4": ("data=2,tensor=4", "tp"),
          "fsdp2xtp4": ("fsdp=2,tensor=4", "fsdp+tp"), "2x2x2": ("data=2,fsdp=2,tensor=2", "dp+fsdp+tp")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("corpus")
    os.environ["HEADWISE_CACHE"] = str(folder / "cache")
    rng = np.random.default_rng(0)
    words = ["query", "key", "value", "head", "mole", "tower", "pattern"]
    (folder / "text.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(2000)))
    return str(folder / "text.txt")


def _config(corpus, mesh: str = "data=1", extra=()):
    axes = dict(p.split("=") for p in mesh.split(","))
    return load_config(None, SETUP + [f"data.path={corpus}"] + [
        f"mesh.{a}={axes.get(a, 1)}" for a in ("data", "fsdp", "tensor")] + list(extra))


def _losses(run_dir) -> list[float]:
    rows = [json.loads(l) for l in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _assert_trains_like(losses, one_device):
    """A mesh adds the same terms as one device in other orders (tests/tolerances.py): each
    step's loss is within loss_gap of one device's (1.5e-3, 2.7e-4 of it; logits stay below 1
    in these steps, 0.73 at init), and the earlier steps' gaps, through Adam's steps of lr <=
    2e-3, move the params by about lr·Σ|gap| more, ~1e-4 of loss per step: twice loss_gap
    covers 4 steps. Seen: 2.4e-6 at most. A skipped or wrong update moves the losses of steps
    2-4 by 0.04 to 0.23."""
    cfg = load_config(None, SETUP)
    n_tokens = cfg.train.batch_size * cfg.model.context_length
    gap = loss_gap(cfg.model, cfg.model.context_length, n_tokens, 1.0, max(one_device))
    np.testing.assert_allclose(losses, one_device, atol=2 * gap, rtol=0)


@pytest.fixture(scope="module")
def one_device(corpus, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("one")
    train(_config(corpus), run_dir, progress=False, devices=jax.devices()[:1])
    return _losses(run_dir)


@pytest.mark.parametrize("name", [n for n in MESHES if n != "2x2x2"])  # that one: the CLI test
def test_every_strategy_trains_like_one_device(name, corpus, one_device, tmp_path):
    mesh, strategy = MESHES[name]
    train(_config(corpus, mesh, [f"mesh.strategy='{strategy}'"]), tmp_path, progress=False)
    _assert_trains_like(_losses(tmp_path), one_device)


def _cli(args, **kwargs):
    env = dict(os.environ, XLA_FLAGS="")  # --devices decides, not the test session's flag
    return subprocess.run([sys.executable, "-m", "headwise.train.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_on_simulated_devices(corpus, one_device, tmp_path):
    result = _cli(["train", "--devices", "8", "--mesh", MESHES["2x2x2"][0], "--run-dir",
                   str(tmp_path), "--set", *SETUP, f"data.path={corpus}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dp+fsdp+tp" in result.stderr + result.stdout
    _assert_trains_like(_losses(tmp_path), one_device)


_SIMULATED = """
import os, jax, jax.numpy as jnp
from headwise.parallel.launch import simulate_cpu_devices
simulate_cpu_devices(2)
total = jax.pmap(lambda x: jax.lax.psum(x, "d"), axis_name="d")(jnp.arange(2.0))
print(len(jax.devices()), total.tolist(), os.environ["XLA_FLAGS"], sep="|")
"""


@pytest.mark.parametrize("asked", ["", "--xla_cpu_collective_call_terminate_timeout_seconds=77"])
def test_simulated_devices_wait_longer_for_a_late_one(asked):
    """`--devices N` gives XLA:CPU's collectives 300 s, not 40, to wait for a starved device
    thread (a flag XLA accepts: it aborts on an unknown one), unless the user chose a time."""
    env = dict(os.environ, XLA_FLAGS=asked)
    out = subprocess.run([sys.executable, "-c", _SIMULATED], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    devices, total, flags = out.stdout.strip().split("|")
    assert devices == "2" and total == "[1.0, 1.0]"
    assert flags.split() == [asked or "--xla_cpu_collective_call_terminate_timeout_seconds=300",
                             "--xla_cpu_collective_timeout_seconds=300"]


def test_restore_onto_another_mesh(corpus, one_device, tmp_path):
    fsdp8 = _config(corpus, "fsdp=8")
    train(fsdp8, tmp_path, progress=False, stop_at=2)
    # The same checkpoint, onto 2 fsdp x 4 tp: identical values, the target shardings.
    from headwise import parallel
    from headwise.train.layout import resolve_run
    from headwise.train.loop import build_program
    from headwise.train.state import restore_or_create
    other = _config(corpus, "fsdp=2,tensor=4")
    layout = resolve_run(other)
    program = build_program(other, layout)  # as the run builds it
    manager = checkpoint.open_manager(tmp_path, keep=5)
    restored = restore_or_create(other.model, program.optimizer, other.train.seed,
                                 program.shardings, manager)
    single = checkpoint.restore(manager, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        restored))[0]
    manager.close()
    wanted = parallel.param_shardings(other.model, layout.mesh, layout.rules)
    for a, b, s in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(single["params"]),
                       jax.tree.leaves(wanted)):
        assert a.sharding.is_equivalent_to(s, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored["step"]) == 2
    # Training goes on from step 2 on the new mesh, with the losses of an unbroken run.
    train(other, tmp_path, progress=False)
    _assert_trains_like(_losses(tmp_path), one_device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(corpus, one_device, tmp_path):
    """2 processes x 4 CPU devices, jax.distributed over gloo on localhost."""
    port = _free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        args = ["train", "--devices", "4", "--coordinator", f"localhost:{port}",
                "--num-processes", "2", "--process-id", str(i), "--mesh", "data=2,fsdp=4",
                "--run-dir", str(tmp_path / "run"), "--set", *SETUP, f"data.path={corpus}"]
        env = dict(os.environ, XLA_FLAGS="")
        with log.open("w") as out:  # the child keeps its own copy of the file
            procs.append(subprocess.Popen([sys.executable, "-m", "headwise.train.cli", *args],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    output = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0, 0], output
    assert "2 process(es)" in logs[0].read_text(), output
    _assert_trains_like(_losses(tmp_path / "run"), one_device)
