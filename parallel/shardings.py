"""NamedSharding trees for params, optimizer state and batches; params born sharded."""
import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from headwise.model import ModelConfig, init_params, param_axes
from headwise.train.step import init_state

from .checks import batch_devices, check_params_divisible
from .rules import as_rules, spec


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_specs_tree(cfg: ModelConfig, rules) -> dict:
    """PartitionSpec of every parameter (same tree as `init_params`)."""
    rules = as_rules(rules)
    return jax.tree.map(lambda axes: spec(axes, rules), param_axes(cfg), is_leaf=_is_axes)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules) -> dict:
    """NamedSharding of every parameter."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs_tree(cfg, rules),
                        is_leaf=lambda x: isinstance(x, P))


def _dict_suffix(path) -> tuple:
    """The trailing dict keys of a tree path: where an optax leaf sits in the param tree."""
    keys = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(k.key)
    return tuple(reversed(keys))


def follow_params(tree, params_abstract: dict, params_sharding: dict, mesh) -> dict:
    """Shardings for a tree (e.g. an optax state) whose param-shaped leaves sit under the same
    dict keys as in the params: those follow the param's sharding; everything else (step
    counts, scalars) is replicated."""
    flat = jax.tree_util.tree_flatten_with_path(params_sharding)[0]
    by_path = {_dict_suffix(p): s for p, s in flat}
    shapes = {_dict_suffix(p): a.shape
              for p, a in jax.tree_util.tree_flatten_with_path(params_abstract)[0]}

    def pick(path, leaf):
        key = _dict_suffix(path)
        if key in by_path and shapes[key] == np.shape(leaf):
            return by_path[key]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(cfg: ModelConfig, optimizer, mesh: jax.sharding.Mesh, rules) -> dict:
    """Shardings of the whole train state (see train.step.init_state)."""
    params_sh = param_shardings(cfg, mesh, rules)
    params_abs = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    state_abs = jax.eval_shape(lambda p, k: init_state(p, optimizer, k), params_abs,
                               jax.random.key(0))
    return {"params": params_sh,
            "opt_state": follow_params(state_abs["opt_state"], params_abs, params_sh, mesh),
            "step": replicated(mesh), "key": replicated(mesh)}


def init_sharded(cfg: ModelConfig, key: jax.Array, mesh: jax.sharding.Mesh, rules,
                 **jit_kwargs) -> dict:
    """Fresh parameters created already sharded: no device ever holds the whole tree."""
    check_params_divisible(cfg, mesh, rules)
    shardings = param_shardings(cfg, mesh, rules)
    abstract = jax.eval_shape(functools.partial(init_params, cfg), key)
    assert jax.tree.structure(abstract) == jax.tree.structure(shardings)
    return jax.jit(functools.partial(init_params, cfg), out_shardings=shardings,
                   **jit_kwargs)(key)


def init_sharded_state(cfg: ModelConfig, params: dict, optimizer, key: jax.Array,
                       mesh: jax.sharding.Mesh, rules, **jit_kwargs) -> dict:
    """The train state around (sharded) params; optimizer state born with the params' layout.
    `params` is donated."""
    shardings = state_shardings(cfg, optimizer, mesh, rules)
    make = jax.jit(lambda p, k: init_state(p, optimizer, k), out_shardings=shardings,
                   donate_argnums=0, **jit_kwargs)
    return make(params, key)


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
    """[batch, time] arrays: batch split as the rules say, time whole."""
    return NamedSharding(mesh, P(spec(("batch",), rules)[0], None))


def shard_batch(local_batch, mesh: jax.sharding.Mesh, rules):
    """A tree of this process's [local_batch, T] numpy arrays -> global sharded jax.Arrays."""
    sharding = batch_sharding(mesh, rules)
    n = batch_devices(mesh, rules)

    def one(a):
        a = np.asarray(a)
        global_rows = a.shape[0] * jax.process_count()
        if global_rows % n:
            raise ValueError(f"global batch of {global_rows} rows does not split over the {n} "
                             f"batch-sharded devices; make train.batch_size a multiple of {n}")
        return jax.make_array_from_process_local_data(sharding, a, (global_rows, *a.shape[1:]))

    return jax.tree.map(one, local_batch)
