"""Seeing where time goes: `--profile START:STOP` traces, and the persistent compilation cache."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from headwise.train.config import load_config
from headwise.train.loop import train
from headwise.train.profile import PROGRAM, hlo_kinds, op_events, parse_steps, time_by_op

TINY = ["model.preset=tiny", "model.vocab_size=256", "model.context_length=32",
        "train.batch_size=8", "train.eval_steps=1", "train.sample_tokens=0"]


@pytest.fixture
def corpus(tmp_path) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(["mole", "tower", "head", "key"], 6))
                              for _ in range(500)))
    return str(path)


def test_profile_traces_the_steps_asked_for(corpus, tmp_path):
    """Steps 2..3 of a 5-step run: the Perfetto trace holds exactly two step annotations, with
    those step numbers, and the compiled train step's execution inside them."""
    cfg = load_config(None, TINY + [f"data.path={corpus}", "train.steps=5"])
    train(cfg, tmp_path / "run", progress=False, profile=(2, 4))
    [trace] = (tmp_path / "run" / "profile").rglob("perfetto_trace.json.gz")
    events = json.load(gzip.open(trace))["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and e.get("name") == "train"]
    assert sorted(int(e["args"]["step_num"]) for e in steps) == [2, 3]
    executions = [e for e in events if e.get("ph") == "X" and "ThunkExecutor" in e["name"]
                  or e.get("name") == "PjitFunction(traced)"]
    first, last = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    assert any(first <= e["ts"] <= last for e in executions)
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))  # for TensorBoard / XProf
    # Where the time went: the steps' matmuls are found, and the ops (8 simulated devices'
    # threads sharing the cores) took less than 8 times the steps' wall time.
    summary = time_by_op(trace)
    # The compiled step kept beside the trace is the traced program: it names every op.
    kinds = hlo_kinds((tmp_path / "run" / "profile" / PROGRAM).read_text())
    assert {name for name, _ in op_events(events)} <= kinds.keys()
    per_step = float(summary.split("op time per step ")[1].split(" ms")[0])
    wall_ms = sum(e["dur"] for e in steps) / 1e3 / len(steps)
    assert "2 steps" in summary and _per_kind(summary)["matmuls"] > 0, summary
    assert 0 < per_step < 8 * wall_ms, (summary, wall_ms)


def _trace_file(path, events, processes, threads):
    """A Perfetto JSON trace as jax.profiler writes it: metadata events naming each process
    and thread, then complete ("X") events with start and duration in microseconds."""
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
            for pid, name in processes.items()]
    meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
             for (pid, tid), name in threads.items()]
    ops = [{"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
           for pid, tid, name, ts, dur in events]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + ops}, f)
    return path


def _per_kind(summary: str) -> dict:
    return {line.split("%  ")[1]: float(line.split()[0]) for line in summary.splitlines()
            if "%  " in line}


def test_time_by_op_counts_each_op_once(tmp_path):
    """Hand-made traces, the sums done by hand. A GPU's stream: two kernels that overlap by
    1 µs (the next launched before the last ends) both count whole; the host's events do
    not count. A CPU's XLA thread: a while loop counts as the ops inside it, the executor's
    spans and end markers not at all."""
    gpu = _trace_file(tmp_path / "gpu.json.gz", [
        (1, 7, "nvjet_sm90_tst_128x128_NNT", 0, 3000), (1, 7, "cudnn_sdpa_flash_fprop", 2999, 1000),
        (1, 7, "loop_add_fusion", 4000, 500), (1, 7, "input_transpose_fusion", 4600, 400),
        (2, 1, "train", 0, 9000), (2, 1, "PjitFunction(step)", 0, 50),
        (1, 7, "nvjet_sm90_tst_128x128_NNT", 9000, 3000)],
        {1: "/device:GPU:0", 2: "/host:CPU"}, {(1, 7): "Stream #14(Compute)", (2, 1): "python3"})
    assert _per_kind(time_by_op(gpu, steps=2)) == {"matmuls": 3.0, "attention": 0.5,
                                                   "other ops": 0.25, "copies and transposes": 0.2}
    cpu = _trace_file(tmp_path / "cpu.json.gz", [
        (2, 5, "ThunkExecutor::Execute", 0, 1000), (2, 5, "while.3", 10, 900),
        (2, 5, "dot.1", 20, 300), (2, 5, "end: dot.1", 319, 1), (2, 5, "fusion.2", 400, 100),
        (2, 6, "Rendezvous", 300, 600), (2, 6, "Wait: pending_threads=1/8", 300, 600),
        (2, 6, "dot.4", 0, 200), (2, 1, "dot.9", 0, 5000), (2, 1, "train", 0, 1200)],
        {2: "/host:CPU"}, {(2, 5): "tf_XLAEigen/1", (2, 6): "tf_XLAEigen/2", (2, 1): "python3"})
    summary = time_by_op(cpu)
    assert _per_kind(summary) == {"matmuls": 0.5, "other ops": 0.1}, summary
    assert summary.startswith("op time per step 0.6 ms (3 ops, 1 steps)"), summary


# A compiled CPU program's text as Compiled.as_text() writes it (cut down): a YNNPACK matmul,
# a transpose, a fusion that returns a tuple, and an elementwise loop.
CPU_PROGRAM = """HloModule jit_traced, is_scheduled=true

%fused_computation.1 (param_0: f32[64,32], param_1: f32[32,16]) -> f32[64,16] {
  %param_0 = f32[64,32]{1,0} parameter(0)
  %param_1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.0 = f32[64,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: f32[64,16]) -> f32[16,64] {
  %param_0.1 = f32[64,16]{1,0} parameter(0)
  %bitcast.1 = f32[16,64]{0,1} bitcast(%param_0.1)
  ROOT %copy.1 = f32[16,64]{1,0} copy(%bitcast.1)
}

%fused_computation.3 (param_0.2: f32[64,16]) -> (f32[64,16], f32[16]) {
  %param_0.2 = f32[64,16]{1,0} parameter(0)
  %multiply.1 = f32[64,16]{1,0} multiply(%param_0.2, %param_0.2)
  %constant.1 = f32[] constant(0)
  %reduce.1 = f32[16]{0} reduce(%multiply.1, %constant.1), dimensions={0}, to_apply=%add
  ROOT %tuple.1 = (f32[64,16]{1,0}, f32[16]{0}) tuple(%multiply.1, %reduce.1)
}

ENTRY %main.1 (x: f32[64,32], w: f32[32,16]) -> (f32[16,64], f32[16]) {
  %x = f32[64,32]{1,0} parameter(0)
  %w = f32[32,16]{1,0} parameter(1)
  %ynn_fusion = f32[64,16]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1
  %transpose_fusion = f32[16,64]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_computation.2
  %multiply_reduce_fusion = (f32[64,16]{1,0}, f32[16]{0}) fusion(%ynn_fusion), kind=kLoop, calls=%fused_computation.3
  %get-tuple-element.1 = f32[16]{0} get-tuple-element(%multiply_reduce_fusion), index=1
  ROOT %tuple.2 = (f32[16,64]{1,0}, f32[16]{0}) tuple(%transpose_fusion, %get-tuple-element.1)
}
"""


def test_the_compiled_program_says_what_each_cpu_op_is(tmp_path):
    """On the CPU a matmul's op is `ynn_fusion`: by its name alone it is "other". With the
    compiled program's text each op is what its instructions do (sums done by hand)."""
    assert {k: v for k, v in hlo_kinds(CPU_PROGRAM).items() if k.endswith("fusion")} == {
        "ynn_fusion": "matmuls", "transpose_fusion": "copies and transposes",
        "multiply_reduce_fusion": "other ops"}
    cpu = _trace_file(tmp_path / "cpu.json.gz", [
        (2, 5, "ynn_fusion", 0, 600), (2, 5, "transpose_fusion", 600, 100),
        (2, 5, "multiply_reduce_fusion", 700, 300), (2, 1, "train", 0, 1000)],
        {2: "/host:CPU"}, {(2, 5): "tf_XLAEigen/1", (2, 1): "python3"})
    assert _per_kind(time_by_op(cpu)) == {"other ops": 0.9, "copies and transposes": 0.1}
    summary = time_by_op(cpu, hlo_text=CPU_PROGRAM)
    assert _per_kind(summary) == {"matmuls": 0.6, "other ops": 0.3,
                                  "copies and transposes": 0.1}, summary
    assert "0.60 ms  ynn_fusion (matmuls)" in summary


@pytest.mark.parametrize("text", ["5", "5:5", "a:b", "-1:3", "7:2"])
def test_profile_steps_are_checked(text):
    with pytest.raises(ValueError, match="--profile expects START:STOP"):
        parse_steps(text)


def _train_cli(corpus, run, cache, *flags):
    env = dict(os.environ, XLA_FLAGS="", HEADWISE_COMPILE_CACHE=str(cache))
    done = subprocess.run(
        [sys.executable, "-m", "headwise.train.cli", "train", "--devices", "1", "--run-dir",
         str(run), *flags, "--set", *TINY, f"data.path={corpus}", "train.steps=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_second_start_reads_the_compilation_cache(corpus, tmp_path):
    """A first start writes its compiled programs (init, train step, eval step ...) into the
    cache folder; a second start of the same config finds every one: it writes nothing new."""
    cache = tmp_path / "cache"
    _train_cli(corpus, tmp_path / "a", cache)
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(first) >= 3, first
    _train_cli(corpus, tmp_path / "b", cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == first


def test_no_compile_cache_flag_and_off(tmp_path, monkeypatch):
    """--no-compile-cache, or HEADWISE_COMPILE_CACHE=off, leave JAX's cache unset."""
    import jax
    from headwise.train import compile_cache
    from headwise.train.cli import _use_compile_cache
    before = jax.config.jax_compilation_cache_dir  # the test session's own, or None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    _use_compile_cache(False)
    monkeypatch.setenv(compile_cache.ENV, "off")
    _use_compile_cache(True)
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "home"))
    assert compile_cache.cache_folder() == tmp_path / "home" / "jax-compile"


def test_compile_cache_stays_off_across_cpu_devices(tmp_path, monkeypatch, capsys):
    """This process has 8 CPU devices: programs across them, loaded from the cache, sometimes
    deadlocked (test_restore_onto_another_mesh aborted in 2 of 8 runs with a warm cache, in
    none of 13 with a cold one), so the cache is not turned on, and the run says why."""
    import jax
    from headwise.train import compile_cache
    from headwise.train.cli import _use_compile_cache
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    _use_compile_cache(True)
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "cache").exists()
    assert "compilation cache off: XLA:CPU programs across 8 CPU devices" in capsys.readouterr().out


_FAULTS_PER_CALL = """
import resource, statistics, sys
from headwise.parallel.launch import keep_freed_memory
applied = sys.argv[1] == "keep" and keep_freed_memory()
import jax, jax.numpy as jnp
from headwise.model import ModelConfig, init_params, loss
cfg = ModelConfig.preset("byte-cpu")
params = init_params(cfg, jax.random.key(0))
x = jnp.zeros((16, cfg.context_length), jnp.int32)
grad = jax.jit(jax.grad(lambda p: loss(p, x, x, cfg)))  # 110 MB of temporaries
for _ in range(3):  # the heap grows to the program's size
    jax.block_until_ready(grad(params))
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(grad(params))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults))
"""


def test_freed_memory_is_reused_not_faulted_in_again():
    """`headwise` keeps freed host memory (parallel.launch.keep_freed_memory): the temporaries
    of the default model's gradient (110 MB), which glibc would map afresh at every call
    and page-fault in again (4 kB a fault), are reused. Page faults, not time: counted by the
    kernel, the same on a loaded machine. The median call: with the memory kept, the heap
    still grows now and then (a whole 27k-fault call in 0 to 3 of 10 calls seen, more often on a
    loaded machine, as the threads' allocations interleave differently), but most calls
    fault nothing in; without it every call faults all of it in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("LD_PRELOAD", None)
    faults = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, mode], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        assert out[0] == str(mode == "keep"), out
        faults[mode] = float(out[1])
    assert faults["default"] > 20_000 and faults["keep"] < faults["default"] / 5, faults  # seen 27k, 0
