"""The per-device plan held to the compiler on 8 simulated devices (XLA's memory_analysis and
the collectives in its HLO), the HLO reader held to programs whose collectives are known, the
plan's one-line errors, and the sweep's bookkeeping."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from headwise import parallel
from headwise.model import ModelConfig, count_params, flops_per_token, param_axes
from headwise.parallel.hardware import HARDWARE, get_hardware
from headwise.parallel.hlo import collective_bytes, shape_bytes
from headwise.parallel.plan import check_fits, plan_step
from headwise.train import cli, sweep as sweep_module
from headwise.train.config import MeshConfig, OptimConfig, RunConfig
from headwise.train.layout import Layout, shard_state
from headwise.train.optim import learning_rate, make_optimizer
from headwise.train.plan import plan_run
from headwise.train.state import abstract_state
from headwise.train.step import make_train_step
from compile_options import FAST

CFG = ModelConfig(vocab_size=256, context_length=32, d_model=64, n_heads=8, d_head=8, n_layers=2,
                  d_mlp=256)
# A second size: deeper, wider, longer vocabulary, fewer and wider heads, shorter sequences.
CFG2 = ModelConfig(vocab_size=512, context_length=16, d_model=128, n_heads=4, d_head=32,
                   n_layers=3, d_mlp=384)
MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (2, 1, 4), "fsdp+tp": (1, 2, 4),
          "dp+fsdp+tp": (2, 2, 2)}
BATCH = 8


@functools.cache
def _measured(strategy: str, cfg: ModelConfig = CFG, batch: int = BATCH):
    """(XLA's memory stats, collective operand bytes by kind, the plan) of one train step."""
    data, fsdp, tensor = MESHES[strategy]
    mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    mesh = parallel.make_mesh(mesh_cfg)
    rules, name = parallel.resolve(mesh_cfg, mesh)
    assert name == strategy
    optimizer = make_optimizer(OptimConfig(), 10, param_axes(cfg))
    shardings = shard_state(abstract_state(cfg, optimizer), cfg, Layout(mesh, rules, name))
    step = make_train_step(cfg, optimizer, learning_rate(OptimConfig(), 10), 1, shardings, **FAST)
    tokens = jax.ShapeDtypeStruct((batch, cfg.context_length), jnp.int32,
                                  sharding=shardings.batch)
    compiled = step.lower(shardings.abstract, {"inputs": tokens, "targets": tokens}).compile()
    plan = plan_step(cfg, dict(mesh.shape), rules, get_hardware("cpu"), batch, strategy=name)
    return compiled.memory_analysis(), collective_bytes(compiled.as_text()), plan


def _batch_bytes(plan) -> int:
    """Each device's rows of the inputs and targets (int32): the rest of the step's arguments."""
    rows = plan.batch // (plan.mesh["data"] * plan.mesh["fsdp"])
    return 2 * rows * plan.seq * 4


CASES = [(s, CFG) for s in MESHES] + [("fsdp+tp", CFG2)]
IDS = [f"{s}-{'small' if c is CFG else 'second'}" for s, c in CASES]


@pytest.mark.parametrize("strategy,cfg", CASES, ids=IDS)
def test_plan_argument_bytes_match_the_compiler(strategy, cfg):
    """Parameters + optimizer state (+ the batch) per device: XLA's argument bytes within 5%
    (seen: within 0.01%; the step count and PRNG key are the difference)."""
    memory, _, plan = _measured(strategy, cfg)
    predicted = plan.params_bytes + plan.optimizer_bytes + _batch_bytes(plan)
    assert abs(predicted / memory.argument_size_in_bytes - 1) <= 0.05, (
        predicted, memory.argument_size_in_bytes)


@pytest.mark.parametrize("strategy,cfg", CASES, ids=IDS)
def test_plan_collective_bytes_match_the_hlo(strategy, cfg):
    """The collectives' operand bytes per device per step, all kinds together, within 10% of
    what the compiled HLO's collectives add up to (each loop iteration counted). Per kind they
    differ on the CPU: it all-reduces what a GPU or TPU reduce-scatters (the same operand
    bytes), and on 2x2x2 it replicates the embedding table (docs/scaling.md)."""
    _, measured, plan = _measured(strategy, cfg)
    predicted = sum(c.operand_bytes for c in plan.collectives)
    assert abs(predicted / sum(measured.values()) - 1) <= 0.10, (predicted, measured)


@pytest.mark.parametrize("strategy,cfg", CASES, ids=IDS)
def test_plan_temporary_bytes_within_stated_tolerance(strategy, cfg):
    """XLA's temporaries hold the gradients and what the forward pass saves (the plan's
    gradients + activations + weight copies) and working buffers the plan does not count (the
    update, the logits' gradient, and on the CPU the full gradient it all-reduces before
    slicing its shard): the plan is 50% to 100% of them (seen: 52% for fsdp, 63% for dp, 74-77%
    else; since the norms and GELU save only their inputs (model/fused.py), those uncounted
    buffers weigh more: fsdp's temporaries went from 1.23 to 0.89 MB)."""
    memory, _, plan = _measured(strategy, cfg)
    predicted = plan.grads_bytes + plan.activation_bytes + plan.weight_copy_bytes
    assert 0.50 <= predicted / memory.temp_size_in_bytes <= 1.0, (
        predicted, memory.temp_size_in_bytes)


def test_plan_activations_grow_with_the_batch_as_xla_says():
    """Doubling the batch adds one more batch of saved activations to XLA's temporaries: the
    plan's (JAX's residual list) is 80% to 160% of what XLA adds (seen: 146%). JAX lists a
    reshaped view beside its source (one buffer to XLA) and outputs XLA recomputes inside the
    backward's fusions (the norms', GELU's); with model/fused.py saving only the norms' and
    GELU's inputs, XLA's growth fell from 872 to 270 kB and those became a larger share (the
    plan said 86% before)."""
    small, big = _measured("dp"), _measured("dp", CFG, 2 * BATCH)
    added = big[0].temp_size_in_bytes - small[0].temp_size_in_bytes
    predicted = big[2].activation_bytes - small[2].activation_bytes
    assert 0.80 <= predicted / added <= 1.6, (predicted, added)


# --- The HLO reader against programs whose collectives are known --------------------------

def test_shape_bytes():
    assert shape_bytes("f32[64,192]{1,0}") == 64 * 192 * 4
    assert shape_bytes("(bf16[8]{0}, s32[], pred[3,2]{1,0})") == 16 + 4 + 6


def test_collective_bytes_counts_every_loop_iteration():
    """A psum inside a 3-trip loop moves its operand 3 times; an all-gather outside, once."""
    mesh = jax.make_mesh((8,), ("x",))

    def body(a_shard):
        a_shard = jax.lax.fori_loop(0, 3, lambda i, c: c + jax.lax.psum(c, "x"), a_shard)
        return jax.lax.all_gather(a_shard, "x", tiled=True)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    a = jax.device_put(jnp.ones((8, 16), jnp.float32), jax.NamedSharding(mesh, P("x")))
    counted = collective_bytes(f.lower(a).compile().as_text())
    shard = 16 * 4  # one row of 16 floats per device
    assert counted["all-reduce"] == 3 * shard
    assert counted["all-gather"] == shard


# --- One-line errors before anything compiles -----------------------------------------------

def _run_cfg(**mesh) -> RunConfig:
    return RunConfig(model=ModelConfig.preset("gpt2-small", vocab_size=50304),
                     mesh=MeshConfig(**{"data": 1, **mesh}))


def test_unknown_hardware_names_the_choices():
    with pytest.raises(ValueError, match=r"--hardware 'b200' is not in the table; choose one of: "
                                         r"h100, h200, a100, tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, cpu"):
        get_hardware("b200")
    assert get_hardware("V5P").name == "tpu-v5p"
    assert all(h.source for h in HARDWARE.values())


def test_mesh_that_does_not_divide_names_the_field():
    with pytest.raises(ValueError, match=r"ModelConfig.n_heads=12 is not divisible by mesh "
                                         r"tensor=8"):
        plan_run(_run_cfg(tensor=8), "h100")
    with pytest.raises(ValueError, match=r"train.batch_size=16 is not divisible by .*fsdp=32"):
        plan_run(_run_cfg(fsdp=32), "h100")
    with pytest.raises(ValueError, match=r"no -1"):
        plan_run(_run_cfg(data=2, fsdp=-1), "h100")


def test_plan_that_does_not_fit_says_what_would():
    gpt3 = RunConfig(model=ModelConfig.preset("gpt3-175b", vocab_size=50304),
                     mesh=MeshConfig(data=8, fsdp=16, tensor=8))
    p = plan_run(gpt3, "h100", batch=128)
    assert check_fits(p).startswith("does not fit: ") and "h100's 80 GB: activations for 1 " \
        "rows per device are" in check_fits(p) and "model.remat=full (" in check_fits(p)
    # Remat needs a rolled scan (ModelConfig refuses it unrolled whole): the fix says so.
    unrolled = dataclasses.replace(gpt3, model=dataclasses.replace(gpt3.model, scan_unroll=96))
    assert "model.remat=full model.scan_unroll=48 (" in check_fits(plan_run(unrolled, "h100",
                                                                            batch=128))
    # The state alone: 16 bytes per parameter (f32 weights, gradients, two AdamW moments) is
    # 2.79 TB, 35 H100s' worth, plus the stacked query/key/value copies the backward keeps.
    small_mesh = dataclasses.replace(gpt3, mesh=MeshConfig(data=8, fsdp=2, tensor=8))
    problem = check_fits(plan_run(small_mesh, "h100", batch=16))
    need = int(problem.split("fsdp x tensor >= ")[1].split(" ")[0])
    assert 35 <= need <= 40 and problem.endswith("(now 16)"), problem
    # Fewer rows fit: the suggested batch does.
    remat = dataclasses.replace(gpt3, model=dataclasses.replace(gpt3.model, remat="full",
                                                                dtype="bfloat16"))
    problem = check_fits(plan_run(remat, "h100", batch=1536))
    suggested = int(problem.split("--batch ")[1].split(" ")[0].replace(",", ""))
    assert check_fits(plan_run(remat, "h100", batch=suggested)) is None
    assert check_fits(plan_run(_run_cfg(), "h100", batch=1)) is None


def test_plan_suggests_the_chunked_loss_where_logits_fill_memory():
    """GPT-2 small in bf16 at 192 rows on one A100 does not fit, and over a third of its
    activations are the loss's f32 logits (192 x 1,024 x 50,304 x 4 bytes = 39.6 GB). The fix
    names `model.loss_chunk`; taken, the activations fall by at least those logits (JAX's own
    inventory of what the backward keeps), the step fits, and its compute grows by the logits'
    one more matmul, 2·D·V FLOPs a token."""
    cfg = _run_cfg()
    bf16 = lambda **kw: dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, dtype="bfloat16", **kw))
    whole, chunked = (plan_run(bf16(loss_chunk=n), "a100", batch=192) for n in (0, 512))
    logits = 192 * 1024 * 50304 * 4
    assert f"--set model.loss_chunk=512 (the loss's logits, {logits / 1e9:.3g} GB here" in \
        check_fits(whole)
    assert whole.activation_bytes - chunked.activation_bytes >= logits
    assert check_fits(chunked) is None
    extra = 2 * 768 * 50304 * 192 * 1024 / chunked.hardware.peak_flops
    assert chunked.compute_s == pytest.approx(whole.compute_s + extra, rel=1e-12)


def test_gpt3_plan_carries_the_explanations_figures():
    """175B f32 parameters over fsdp 16 x tensor 8: a 128th of the matrices' 698 GB each, plus
    the position table, norms and width-sized biases, which are split over fsdp only (10 MB
    more per device, 0.18%); AdamW's two moments twice that; 6 FLOPs per weight per token
    plus attention's 12 L N H T (PaLM's count)."""
    cfg = ModelConfig.preset("gpt3-175b", vocab_size=50304)
    p = plan_run(RunConfig(model=cfg, mesh=MeshConfig(data=8, fsdp=16, tensor=8)), "h100",
                 batch=1024)
    total = 96 * 96 * 6_291_456 + 96 * 2 * 12_288 * 49_152 + 50_304 * 12_288 + 2048 * 12_288
    assert 0 < p.params_bytes / (4 * total / 128) - 1 < 0.002
    assert p.optimizer_bytes == 2 * p.params_bytes
    tokens = 1024 * 2048
    assert p.flops_per_step == pytest.approx(
        (6 * (count_params(cfg)["total"] - 2048 * 12_288) + 12 * 96 * 96 * 128 * 2048) * tokens)
    assert p.flops_per_step == flops_per_token(cfg) * tokens


def test_plan_cli_json_and_errors(capsys):
    code = cli.main(["plan", "--preset", "gpt2-small", "--set", "model.vocab_size=50304",
                     "--mesh", "fsdp=2,tensor=4", "--hardware", "h100", "--batch", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("params_bytes_per_device", "grads_bytes_per_device", "optimizer_bytes_per_device",
                "activation_bytes_per_device", "flops_per_step", "collective_bytes_per_step",
                "step_time_s", "mfu"):
        assert out[key] > 0, key
    assert out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4} and out["strategy"] == "fsdp+tp"
    assert cli.main(["plan", "--preset", "gpt2-small", "--hardware", "tpu-v9"]) == 2
    assert capsys.readouterr().err.startswith("headwise plan: error: --hardware 'tpu-v9'")


# --- The sweep's bookkeeping (the training itself is the loop's, tested in test_train) ------

def test_ladder_keeps_head_width_and_mlp_ratio():
    base = RunConfig(model=ModelConfig.preset("byte-cpu"))
    rung = sweep_module.ladder_config(base, 96, 40)
    assert (rung.model.d_model, rung.model.d_mlp, rung.model.n_heads, rung.model.d_head) == (
        96, 384, 3, 32)
    assert (rung.train.steps, rung.train.eval_every, rung.train.batch_size) == (
        40, 40, base.train.batch_size)
    with pytest.raises(ValueError, match=r"--widths: 48 is not a multiple of model.d_head=32"):
        sweep_module.ladder_config(base, 48, 40)
    with pytest.raises(ValueError, match=r"--widths expects two or more"):
        sweep_module.parse_widths("64")


def test_power_law_fit_recovers_its_exponent():
    x = np.array([1e4, 3e4, 1e5, 1e6])
    a, alpha = sweep_module.fit_power_law(x, 7.0 * x ** -0.076)
    assert a == pytest.approx(7.0, rel=1e-9) and alpha == pytest.approx(0.076, rel=1e-9)


def test_sweep_rows_plot_and_resume(tmp_path, monkeypatch):
    """Each rung is trained once with its own config (a stand-in for the loop here); the rows
    carry its parameter count, tokens and compute; a second sweep trains only the new width."""
    trained = []

    def fake_train(cfg, run_dir, progress=True):
        trained.append(cfg)
        return {"eval_loss": 10.0 * count_params(cfg.model)["total"] ** -0.1}

    monkeypatch.setattr(sweep_module, "train", fake_train)
    base = RunConfig(model=ModelConfig.preset("byte-cpu"))
    rows = sweep_module.sweep(base, [64, 32], 30, tmp_path, progress=False)
    assert [r["width"] for r in rows] == [32, 64] and len(trained) == 2
    for row, cfg in zip(rows, trained):
        tokens = 30 * base.train.batch_size * base.model.context_length
        assert row["params"] == count_params(cfg.model)["total"] and row["tokens"] == tokens
        assert row["flops"] == flops_per_token(cfg.model) * tokens
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    rows = sweep_module.sweep(base, [32, 64, 128], 30, tmp_path, progress=False)
    assert [c.model.d_model for c in trained] == [32, 64, 128]
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 3
    _, alpha = sweep_module.fit_power_law([r["params"] for r in rows], [r["eval_loss"] for r in rows])
    assert alpha == pytest.approx(0.1, rel=1e-9)
