"""Sharding on 8 simulated CPU devices: every strategy computes what one device computes, the
arrays are really split as the rules say, and bad meshes fail before anything compiles."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from headwise import parallel
from headwise.model import ModelConfig, forward, param_axes, param_shapes
from headwise.train.config import MeshConfig, OptimConfig, RunConfig, TrainConfig
from headwise.train.layout import Layout, resolve_run, shard_state
from headwise.train.optim import learning_rate, make_optimizer
from headwise.train.state import abstract_state, create_state
from headwise.train.step import loss_and_grads, make_eval_step, make_train_step
from compile_options import FAST
from tolerances import adam_first_step_gap, f32_gap, forward_steps, gradient_gap, loss_gap

# Every sharded dimension divides the meshes below; 8 heads so tp=4 leaves 2 per device.
CFG = ModelConfig.preset("tiny", n_heads=8, d_head=8, d_model=32, d_mlp=64, vocab_size=64,
                         context_length=16, attention="dot_product")
OPT = OptimConfig(warmup_steps=0)  # a real update on step 0 (warmup would make lr 0)
OPTIMIZER = make_optimizer(OPT, 10, param_axes(CFG))
SCHEDULE = learning_rate(OPT, 10)
BATCH = 8

MESHES = {  # name: (mesh config, devices used, strategy)
    "1": (MeshConfig(), 1, "dp"),
    "dp8": (MeshConfig(data=8), 8, "dp"),
    "fsdp8": (MeshConfig(fsdp=8), 8, "fsdp"),
    "dp2xtp4": (MeshConfig(data=2, tensor=4), 8, "tp"),
    "fsdp2xtp4": (MeshConfig(fsdp=2, tensor=4), 8, "fsdp+tp"),
    "2x2x2": (MeshConfig(data=2, fsdp=2, tensor=-1), 8, "dp+fsdp+tp"),
}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (BATCH, CFG.context_length + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _mesh(name):
    mesh_cfg, n, strategy = MESHES[name]
    return parallel.make_mesh(mesh_cfg, jax.devices()[:n]), parallel.get_rules(strategy)


def _shardings(name):
    """The train state's shardings on this mesh, as a run derives them (train.layout)."""
    mesh, rules = _mesh(name)
    return shard_state(abstract_state(CFG, OPTIMIZER), CFG, Layout(mesh, rules, MESHES[name][2]))


def _run(name, grad_accum=1):
    return _run_once(name, grad_accum)  # one cache key however it is called


@functools.cache
def _run_once(name, grad_accum):
    """One mesh: init, forward logits, loss and grads, one train step; results on the host,
    plus the live state, batch and jitted step. Cached: each mesh compiles once per session."""
    mesh, rules = _mesh(name)
    parallel.check_divisible(CFG, mesh, rules, BATCH, grad_accum)
    shardings = _shardings(name)
    state = create_state(CFG, OPTIMIZER, 0, shardings.state, **FAST)
    batch = parallel.shard_batch(_batch(), shardings.batch)

    def evaluate(params, batch):
        logits = forward(params, batch["inputs"], CFG)
        value, grads = loss_and_grads(params, batch, CFG)
        return value, logits, grads

    evaluate = jax.jit(parallel.under_rules(evaluate, mesh, rules), **FAST,
                       out_shardings=(shardings.replicated, None, shardings.state["params"]))
    # With accumulation only the step is compared (the plain run already covers the rest).
    loss, logits, grads, logits_shard = (None,) * 4
    if grad_accum == 1:
        loss, logits, grads = evaluate(state["params"], batch)
        logits_shard = logits.sharding.shard_shape(logits.shape)
        loss, logits, grads = jax.device_get((loss, logits, grads))
    host_params = jax.device_get(state["params"])
    step = make_train_step(CFG, OPTIMIZER, SCHEDULE, grad_accum, shardings, **FAST)
    state, metrics = step(state, batch)
    return dict(params=host_params, loss=loss, logits=logits, grads=grads, logits_shard=logits_shard,
                step_loss=float(metrics["loss"]), new_params=jax.device_get(state["params"]),
                state=state, batch=batch, step=step, mesh=mesh)


def _reference(grad_accum=1):
    """The same on one device."""
    return _run("1", grad_accum)


@functools.cache
def _gaps():
    """Worst-case float32 gaps between one device and a mesh, which add the same terms in other
    orders (tests/tolerances.py), from the one-device run: the loss's (5e-4, 1.2e-4 of it),
    each gradient element's (the backward chain on its own Σ|terms|) and each param's after
    Adam's first step (which keeps the gradients' agreement where g is far from 0). Seen: at
    most 0.4% of a gap. A shard's mean taken for the batch's (a missed all-reduce) moves the
    loss by 20x to 40x its gap and the gradients by 4,000x to 20,000x theirs."""
    ref, batch = _reference(), _batch()
    B, T = batch["targets"].shape
    loss = loss_gap(CFG, T, B * T, float(np.abs(ref["logits"]).max()), ref["loss"])
    grads = gradient_gap(ref["params"], batch["inputs"], batch["targets"], CFG)
    params = jax.tree.map(lambda g, d, p: adam_first_step_gap(g, d, p, float(SCHEDULE(0))),
                          ref["grads"], grads, ref["params"])
    return loss, grads, params


def _zero_grad_leaves(grads) -> set:
    """Leaves whose exact gradient is zero: key biases (softmax ignores a shift shared by a
    row of scores). Their computed gradients are rounding noise (~1e-12, within their gap), and
    Adam divides that noise by its eps, so their updates are noise too: they are checked to be
    ~0, not compared."""
    return {jax.tree_util.keystr(p) for (p, g), gap in
            zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(_gaps()[1]))
            if np.all(np.abs(g) <= gap)}


def _assert_within(tree, ref, gaps, what, skip=frozenset()):
    """Elementwise: |a - b| <= gap."""
    for (path, a), b, gap in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                 jax.tree.leaves(ref), jax.tree.leaves(gaps)):
        name = jax.tree_util.keystr(path)
        if name in skip:
            continue
        excess = float((np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(gap, 1e-30)).max())
        assert excess <= 1.0, f"{what}{name}: {excess:.2f} times its float32 gap"


def _assert_close(tree, ref, tol, what, skip=frozenset(), norm=np.max):
    """Per leaf: norm(a - b) <= tol * norm(b); `norm` is max-abs unless given."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(ref)):
        name = jax.tree_util.keystr(path)
        if name in skip:
            continue
        scale = max(float(norm(np.abs(b))), 1e-30)
        err = float(norm(np.abs(np.asarray(a) - np.asarray(b))))
        assert err <= tol * scale, f"{what}{name}: {err:.2e} > {tol} * {scale:.2e}"


def _assert_step_matches(got, ref, zero):
    assert abs(got["step_loss"] - ref["step_loss"]) <= _gaps()[0]
    # Elementwise, Adam's first step is g / (|g| + eps), which turns 1e-12 rounding in a
    # near-zero gradient element into a ~1e-6 move: adam_first_step_gap allows for it there.
    _assert_within(got["new_params"], ref["new_params"], _gaps()[2], "updated params", zero)


@pytest.mark.parametrize("name", [n for n in MESHES if n != "1"])
def test_matches_one_device(name):
    ref, got = _reference(), _run(name)
    _assert_close(got["params"], ref["params"], 0.0, "init")  # the same init on every mesh
    assert abs(got["loss"] - ref["loss"]) <= _gaps()[0]
    # Relative to the largest logit, whose Σ|terms| bounds a logit's within 2x: 2.2e-4 (2e-7 seen).
    _assert_close(got["logits"], ref["logits"],
                  f32_gap(forward_steps(CFG, CFG.context_length), 2.0), "logits")
    # The model names its activations; the rules place them: batch over (data, fsdp) and,
    # under tensor parallelism, the vocabulary too (the cross-entropy above ran on it).
    mesh, rules = _mesh(name)
    assert got["logits_shard"] == (BATCH // parallel.batch_devices(mesh, rules),
                                  CFG.context_length, CFG.vocab_size // mesh.shape["tensor"])
    zero = _zero_grad_leaves(ref["grads"])
    assert zero == _zero_grad_leaves(got["grads"])
    assert zero <= {"['blocks']['attention']['key_bias']"}, zero
    _assert_within(got["grads"], ref["grads"], _gaps()[1], "grads", zero)
    _assert_step_matches(got, ref, zero)
    # ... and the step really changed the params.
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref["new_params"], ref["params"])
    assert np.median(jax.tree.leaves(moved)) > 1e-4


def test_grad_accum_matches_one_device():
    ref, got = _reference(2), _run("2x2x2", grad_accum=2)
    _assert_step_matches(got, ref, _zero_grad_leaves(_reference()["grads"]))
    assert abs(got["step_loss"] - _reference()["step_loss"]) <= _gaps()[0]


@pytest.mark.parametrize("loss_chunk", [0, 5])
def test_bf16_loss_with_the_vocabulary_split_over_tensor(loss_chunk):
    """The 16-bit loss (unembedding and cross-entropy fused over a vocabulary padded from 300 to
    384 columns, split 4 ways over `tensor`; whole, or 5 positions at a time) gives one
    device's loss and gradients, within the bound test_precision holds bf16 gradients to (8
    bf16 roundings of the largest element: the shards add bf16 products in other orders; seen
    4 at most). A missed all-reduce or an unmasked padding column moves them by orders of
    magnitude more."""
    cfg = dataclasses.replace(CFG, vocab_size=300, dtype="bfloat16", loss_chunk=loss_chunk)
    tokens = np.random.default_rng(0).integers(0, 300, (BATCH, cfg.context_length + 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    results = []
    for name in ("1", "fsdp2xtp4"):
        mesh, rules = _mesh(name)
        shardings = shard_state(abstract_state(cfg, OPTIMIZER), cfg, Layout(mesh, rules, MESHES[name][2]))
        params = create_state(cfg, OPTIMIZER, 0, shardings.state, **FAST)["params"]
        value_and_grads = jax.jit(parallel.under_rules(
            lambda p, b: loss_and_grads(p, b, cfg), mesh, rules), **FAST)
        results.append(jax.device_get(value_and_grads(params, parallel.shard_batch(batch, shardings.batch))))
    (value, grads), (value_tp, grads_tp) = results
    assert abs(value - value_tp) <= 2.0 ** -8 * value, (value, value_tp)
    for (path, g), g_tp in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree.leaves(grads_tp)):
        if "key_bias" not in jax.tree_util.keystr(path):  # exactly 0: rounding noise only
            assert np.abs(g - g_tp).max() <= 8 * 2.0 ** -8 * np.abs(g).max(), path


def test_sharded_eval_step():
    evaluate = make_eval_step(CFG, _shardings("fsdp2xtp4"), **FAST)
    run = _run("fsdp2xtp4")
    value = float(evaluate(run["state"]["params"], run["batch"]))
    one = _reference()
    evaluate_one = make_eval_step(CFG, _shardings("1"), **FAST)
    expected = float(evaluate_one(one["state"]["params"], one["batch"]))
    # After one step: the loss's gap plus, to first order, what the params' gaps move it by.
    moved = sum(float(np.sum(np.abs(g) * d)) for g, d in
                zip(jax.tree.leaves(one["grads"]), jax.tree.leaves(_gaps()[2])))
    assert abs(value - expected) <= _gaps()[0] + moved and value < one["loss"]  # after one step


def _shard_shapes(array) -> set:
    return {s.data.shape for s in array.addressable_shards}


@pytest.mark.parametrize("name", list(MESHES))
def test_shards_are_what_the_rules_say(name):
    run = _run(name)
    mesh, rules, params = run["mesh"], _mesh(name)[1], run["state"]["params"]
    specs = parallel.param_specs_tree(CFG, rules)
    for (path, array), spec, shape in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            jax.tree.leaves(param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))):
        entries = tuple(spec) + (None,) * (len(shape) - len(spec))
        expected = tuple(d // parallel.checks.axis_size(mesh, e) for d, e in zip(shape, entries))
        assert _shard_shapes(array) == {expected}, jax.tree_util.keystr(path)
    # The same, spelled out for the strategies' defining arrays.
    L, D, N, H, F, V = (CFG.n_layers, CFG.d_model, CFG.n_heads, CFG.d_head, CFG.d_mlp,
                        CFG.vocab_size)
    att, mlp = params["blocks"]["attention"], params["blocks"]["mlp"]
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    assert _shard_shapes(att["query"]) == {(L, D // f, N // t, H)}
    assert _shard_shapes(att["value_up"]) == {(L, N // t, H, D // f)}
    assert _shard_shapes(mlp["up"]) == {(L, D // f, F // t)}
    assert _shard_shapes(mlp["down"]) == {(L, F // t, D // f)}
    assert _shard_shapes(params["embed"]["token"]) == {(V // t, D // f)}
    # The optimizer's moments are laid out as their params are.
    adam = run["state"]["opt_state"][1][0]  # chain(clip, adamw) -> adamw's scale_by_adam
    for moments in (adam.mu, adam.nu):
        for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(params)):
            assert m.sharding == p.sharding


def test_tensor_parallel_devices_hold_whole_heads():
    query = _run("dp2xtp4")["state"]["params"]["blocks"]["attention"]["query"]  # [L, D, N, H]
    full = np.asarray(query)
    per_device = CFG.n_heads // 4
    held = set()
    for shard in query.addressable_shards:
        heads = range(CFG.n_heads)[shard.index[2]]
        assert len(heads) == per_device and shard.data.shape[3] == CFG.d_head  # whole heads
        np.testing.assert_array_equal(np.asarray(shard.data), full[:, :, heads.start:heads.stop])
        held.add(tuple(heads))
    assert sorted(h for hs in held for h in hs) == list(range(CFG.n_heads))


def _state_bytes_on(state, device) -> int:
    trees = (state["params"], state["opt_state"])
    return sum(s.data.nbytes for a in jax.tree.leaves(trees) for s in a.addressable_shards
               if s.device == device)


def test_fsdp_splits_params_and_optimizer_state_eightfold():
    one, eight = _reference(), _run("fsdp8")
    total = _state_bytes_on(one["state"], one["mesh"].devices.flat[0])
    for device in eight["mesh"].devices.flat:
        assert _state_bytes_on(eight["state"], device) <= total / 8 * 1.05
    # XLA's own figure for the compiled step's per-device arguments (state and batch).
    args = [r["step"].lower(r["state"], r["batch"]).compile().memory_analysis()
            .argument_size_in_bytes for r in (one, eight)]
    assert args[0] >= total
    assert args[1] <= args[0] / 8 * 1.05, args


# --- Clear errors, before anything compiles ------------------------------------------------

@pytest.fixture
def no_compiling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before checking")
    monkeypatch.setattr(jax, "jit", refuse)


def test_mesh_product_must_match_device_count():
    with pytest.raises(ValueError, match=r"mesh.data=3.*8 devices"):
        parallel.make_mesh(MeshConfig(data=3))
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        parallel.make_mesh(MeshConfig(data=3, fsdp=-1))
    assert parallel.make_mesh(MeshConfig(data=2, tensor=-1)).shape["tensor"] == 4


def test_heads_must_divide_tensor(no_compiling):
    mesh = parallel.make_mesh(MeshConfig(data=4, tensor=2))
    cfg = dataclasses.replace(CFG, n_heads=3)
    with pytest.raises(ValueError, match=r"n_heads=3 is not divisible by mesh tensor=2"):
        parallel.check_divisible(cfg, mesh, "tp")
    with pytest.raises(ValueError, match=r"n_heads=3 .*tensor=2"):
        parallel.init_sharded(cfg, jax.random.key(0), mesh, "tp")
    with pytest.raises(ValueError, match=r"n_heads=3 .*tensor=2"):  # a run, when resolved
        resolve_run(RunConfig(model=cfg, mesh=MeshConfig(data=4, tensor=2, strategy="tp")))
    with pytest.raises(ValueError, match=r"vocab_size=61 .*tensor=2.*multiple of 2"):
        parallel.check_divisible(ModelConfig.preset("tiny", n_heads=4), mesh, "tp")


def test_batch_must_divide_data_fsdp_and_accumulation(no_compiling):
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
    parallel.check_divisible(CFG, mesh, "fsdp", 16, 2)
    with pytest.raises(ValueError, match=r"batch_size=12 .*data=2\*fsdp=4 \* train.grad_accum=1"
                                         r".*multiple of 8"):
        parallel.check_divisible(CFG, mesh, "fsdp", 12)
    with pytest.raises(ValueError, match=r"batch_size=8 .*grad_accum=2 = 16"):
        parallel.check_divisible(CFG, mesh, "fsdp", 8, 2)
    # A run checks it when it is resolved (not again per batch).
    run = RunConfig(model=CFG, train=TrainConfig(batch_size=12),
                    mesh=MeshConfig(data=2, fsdp=4, strategy="fsdp"))
    with pytest.raises(ValueError, match=r"batch_size=12 .*multiple of 8"):
        resolve_run(run)


def test_unknown_strategy_and_unused_axis(no_compiling):
    with pytest.raises(ValueError, match=r"'zero3'.*dp, fsdp, tp, fsdp\+tp, dp\+fsdp\+tp"):
        parallel.get_rules("zero3")
    mesh = parallel.make_mesh(MeshConfig(data=2, tensor=4))
    with pytest.raises(ValueError, match=r"mesh.tensor=4 .*strategy fsdp .*'tensor'"):
        parallel.check_divisible(CFG, mesh, "fsdp")


def test_shardings_table_bytes_match_the_real_shards():
    """`headwise shardings` says what each device holds: its total equals the bytes of the
    shards that init_sharded really puts on device 0."""
    import re
    from headwise.parallel.table import shardings_table
    cfg = ModelConfig.preset("tiny", n_heads=4, d_model=32, d_mlp=64, vocab_size=64)
    mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=4)
    mesh = parallel.make_mesh(mesh_cfg)
    rules, name = parallel.resolve(mesh_cfg, mesh)
    table = shardings_table(cfg, mesh, rules, name)
    claimed = int(re.search(r"([\d,]+) bytes per device", table).group(1).replace(",", ""))
    params = parallel.init_sharded(cfg, jax.random.key(0), mesh, rules)
    device0 = jax.devices()[0]
    real = sum(s.data.nbytes for leaf in jax.tree.leaves(params)
               for s in leaf.addressable_shards if s.device == device0)
    assert claimed == real


# --- Layering: model <- parallel <- train --------------------------------------------------

def test_parallel_imports_nothing_from_train():
    """parallel/ shards whatever trees and functions it is handed: no module of it names
    headwise.train, at the top or inside a function."""
    import ast
    import pathlib
    folder = pathlib.Path(parallel.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert {p.stem for p in modules} >= {"__init__", "checks", "mesh", "rules", "shardings"}
    for path in modules:
        source = path.read_text()
        assert "headwise.train" not in source, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} imports from {'.' * node.level}{node.module}"


def test_mesh_axes_are_named_once():
    """MeshConfig has one size field per mesh axis, in the mesh's order."""
    fields = [f.name for f in dataclasses.fields(MeshConfig)]
    assert tuple(fields[:len(parallel.AXES)]) == parallel.AXES
    assert parallel.make_mesh(MeshConfig(data=8)).axis_names == parallel.AXES
