"""The built wheel stands alone: installed into a fresh virtual environment, `headwise train
--config tiny` and `python -m headwise` work from a folder that is not the checkout."""
import json
import math
import os
import pathlib
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(*args, cwd=None, env=None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _copy_sources(dest: pathlib.Path) -> pathlib.Path:
    """What the build reads, so that its build/ and egg-info land in dest, not the checkout."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    folders = {setup["package-dir"].get(p, p.replace(".", "/")).split("/")[0]
               for p in setup["packages"]}
    dest.mkdir()
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy(REPO / name, dest / name)
    for name in folders:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment holding the wheel alone; jax and the other dependencies come
    from this environment's site-packages, named in a .pth file (a folder on a .pth line joins
    sys.path but its own .pth files are not run, so this checkout's editable install stays out)."""
    pytest.importorskip("setuptools", minversion="70.1", reason="building the wheel offline needs "
                        "setuptools>=70.1: pip install -e '.[dev]'")
    tmp = tmp_path_factory.mktemp("package")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", tmp / "wheels", _copy_sources(tmp / "src"))
    wheel, = (tmp / "wheels").glob("headwise-*.whl")
    env = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    # The wheel first, while the new environment sees nothing of this one.
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", wheel)
    new_site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    (pathlib.Path(new_site) / "_dependencies.pth").write_text("\n".join(site.getsitepackages()))
    return env


@pytest.fixture
def outside(tmp_path) -> tuple[pathlib.Path, dict]:
    """A folder that is not the checkout, and an environment that names nothing of it: one CPU
    device, not the suite's eight, and XLA's quickest compiles (the package is on trial here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", HEADWISE_CACHE=str(tmp_path / "cache"),
               XLA_FLAGS="--xla_backend_optimization_level=0")
    return tmp_path, env


def test_installed_from_the_wheel(venv, outside):
    cwd, env = outside
    where = _run(venv / "bin" / "python", "-c",
                 "import headwise.train; print(headwise.train.__file__)", cwd=cwd, env=env)
    assert pathlib.Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not pathlib.Path(where).resolve().is_relative_to(REPO), where


def test_train_a_shipped_config(venv, outside):
    cwd, env = outside
    words = ["mole", "shrew", "carbon", "biopsy", "tower", "eiffel", "head", "key", "query"]
    (cwd / "corpus.txt").write_text("\n".join(" ".join(words[(i * 7 + j * 3) % 9] for j in range(6))
                                              for i in range(400)))
    out = _run(venv / "bin" / "headwise", "train", "--config", "tiny", "--run-dir", "run",
               "--set", "train.steps=4", "train.log_every=1", "train.eval_every=4",
               "train.checkpoint_every=4", "train.sample_tokens=0", "data.path=corpus.txt",
               cwd=cwd, env=env)
    run = cwd / "run"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), out
    assert (run / "checkpoints" / "4").is_dir(), out
    # tiny.toml's model, found in the installed package data, not in a checkout's configs/.
    model = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (model["d_model"], model["n_heads"], model["context_length"]) == (32, 4, 64)


def test_unknown_config_lists_the_shipped_ones(venv, outside):
    cwd, env = outside
    done = subprocess.run([venv / "bin" / "headwise", "train", "--config", "nope"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tiny" in done.stderr and "shakespeare_char" in done.stderr, done.stderr


def test_python_dash_m(venv, outside):
    cwd, env = outside
    out = _run(venv / "bin" / "python", "-m", "headwise", "params", "--preset", "gpt2-small",
               cwd=cwd, env=env)
    assert "124,439,808" in out
