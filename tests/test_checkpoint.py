"""Checkpoints: exact round trips, retention, params-only loading, resharding, clear errors."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from headwise.model import ModelConfig, init_params
from headwise.train import checkpoint

CFG = ModelConfig.preset("tiny")
SINGLE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


@functools.partial(jax.jit, static_argnums=0)
def _params_and_opt_state(cfg, key):
    params = init_params(cfg, key)
    optimizer = optax.adamw(1e-3)
    # One update, so mu, nu and count are not all zeros.
    _, opt_state = optimizer.update(params, optimizer.init(params), params)
    return params, opt_state


def make_state(cfg=CFG, seed=0, step=7):
    params, opt_state = _params_and_opt_state(cfg, jax.random.key(seed))
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(step),
            "key": jax.random.key(seed + 1)}


def run_config(cfg=CFG):
    return {"model": dataclasses.asdict(cfg), "train": {"steps": 10}}


def abstract(state):
    return jax.eval_shape(lambda: state)


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved_run(tmp_path, state, steps=(7,), **kwargs):
    with checkpoint.open_manager(tmp_path, **kwargs) as manager:
        for step in steps:
            assert checkpoint.save(manager, step, state, run_config())
    return tmp_path


def test_round_trip_is_bitwise(tmp_path):
    state = make_state()
    expected = jax.tree.map(np.asarray, {**state, "key": jax.random.key_data(state["key"])})
    target = abstract(state)
    with checkpoint.open_manager(tmp_path) as manager:
        assert checkpoint.save(manager, 7, state, run_config())
        # Saving is async; the arrays may be donated (deleted) as soon as save returns.
        jax.tree.map(lambda x: x.delete(), state)
        restored, config = checkpoint.restore(manager, target)
    assert config == jax.tree.map(lambda x: list(x) if isinstance(x, tuple) else x, run_config())
    assert restored["key"].dtype == target["key"].dtype
    restored["key"] = jax.random.key_data(restored["key"])
    assert_bitwise_equal(restored, expected)
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 7
    # The target carried no shardings: everything lands on one device.
    assert {x.sharding for x in jax.tree.leaves(restored)} == {SINGLE}


def test_keeps_only_newest_n_and_latest_step(tmp_path):
    state = make_state()
    with checkpoint.open_manager(tmp_path, keep=2) as manager:
        assert checkpoint.latest_step(manager) is None
        for step in (1, 2, 3, 4):
            checkpoint.save(manager, step, state, run_config())
        assert checkpoint.latest_step(manager) == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]
    with checkpoint.open_manager(tmp_path, keep=2) as manager:  # a resumed run sees them
        assert checkpoint.latest_step(manager) == 4
        _, _ = checkpoint.restore(manager, abstract(state), step=3)
        with pytest.raises(FileNotFoundError, match=r"no step 1 in .*checkpoints; it has \[3, 4\]"):
            checkpoint.restore(manager, abstract(state), step=1)


def test_save_every_skips_steps_unless_forced(tmp_path):
    state = make_state()
    with checkpoint.open_manager(tmp_path, save_every=5) as manager:
        assert [checkpoint.save(manager, s, state, run_config()) for s in (5, 6, 10)] == [
            True, False, True]
        assert checkpoint.save(manager, 11, state, run_config(), force=True)
        assert not checkpoint.save(manager, 11, state, run_config(), force=True)  # already there
        assert manager.all_steps() == [5, 10, 11]


def test_load_model_returns_params_and_config(tmp_path):
    state = make_state()
    saved_run(tmp_path, state, steps=(3, 7))
    files = sorted((tmp_path / "checkpoints").rglob("*"))
    params, cfg = checkpoint.load_model(tmp_path)
    assert sorted((tmp_path / "checkpoints").rglob("*")) == files  # a reader writes nothing
    assert cfg == CFG
    assert_bitwise_equal(params, state["params"])
    assert {x.sharding for x in jax.tree.leaves(params)} == {SINGLE}


def test_restores_onto_the_requested_shardings(tmp_path):
    state = make_state()
    with checkpoint.open_manager(tmp_path) as manager:
        checkpoint.save(manager, 7, state, run_config())
        mesh = jax.make_mesh((8,), ("fsdp",))
        split, replicated = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P())
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                              abstract(state))
        token = target["params"]["embed"]["token"]  # [V, D]: D = 24 splits 8 ways
        target["params"]["embed"]["token"] = jax.ShapeDtypeStruct(token.shape, token.dtype,
                                                                  sharding=split)
        restored, _ = checkpoint.restore(manager, target)
    token = restored["params"]["embed"]["token"]
    assert token.sharding == split
    assert {s.data.shape for s in token.addressable_shards} == {(CFG.vocab_size, CFG.d_model // 8)}
    assert restored["params"]["final_norm"]["scale"].sharding == replicated
    assert restored["opt_state"][0].mu["embed"]["token"].sharding == replicated
    assert jax.random.key_data(restored["key"]).sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(token), np.asarray(state["params"]["embed"]["token"]))


def test_incompatible_config_is_a_clear_error(tmp_path):
    saved_run(tmp_path, make_state())
    other = jax.eval_shape(functools.partial(make_state, ModelConfig.preset("tiny", d_model=32)))
    with checkpoint.open_manager(tmp_path) as manager:
        with pytest.raises(ValueError, match=r"params/blocks/attention/key: checkpoint has "
                           r"\(2, 24, 3, 8\) float32, target wants \(2, 32, 3, 8\) float32"):
            checkpoint.restore(manager, other)
        with pytest.raises(ValueError, match="fresh --run-dir"):
            checkpoint.restore(manager, abstract({**make_state(), "extra": jnp.zeros(3)}))


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/checkpoints.*headwise train --run-dir"):
        checkpoint.load_model(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint.load_model(tmp_path)


def test_rejects_bad_settings_and_configs(tmp_path):
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        checkpoint.open_manager(tmp_path, keep=0)
    with checkpoint.open_manager(tmp_path) as manager:
        with pytest.raises(ValueError, match="JSON-able"):
            checkpoint.save(manager, 1, make_state(), {"model": object()})
        assert checkpoint.latest_step(manager) is None


def test_no_pickle_files(tmp_path):
    saved_run(tmp_path, make_state())
    names = [p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert names and not any(n.endswith((".pkl", ".pickle")) for n in names)
