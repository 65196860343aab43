"""NamedSharding trees for params, any state that mirrors them, and batches; params born sharded."""
import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from headwise.model import ModelConfig, init_params, param_axes

from .checks import check_params_divisible
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


def state_shardings(abstract_state: dict, params_shardings: dict,
                    mesh: jax.sharding.Mesh) -> dict:
    """Shardings of a state dict holding `params` (e.g. `jax.eval_shape` of a train state):
    the params as given, leaves that mirror a param (optimizer moments) like that param, the
    rest (step, PRNG key, counts) replicated."""
    rest = {k: v for k, v in abstract_state.items() if k != "params"}
    return {**follow_params(rest, abstract_state["params"], params_shardings, mesh),
            "params": params_shardings}


def init_sharded(cfg: ModelConfig, key: jax.Array, mesh: jax.sharding.Mesh, rules,
                 **jit_kwargs) -> dict:
    """Fresh parameters created already sharded (no device ever holds the whole tree), for
    use outside a training run; a run creates its whole state this way (train.state)."""
    check_params_divisible(cfg, mesh, rules)
    return jax.jit(functools.partial(init_params, cfg),
                   out_shardings=param_shardings(cfg, mesh, rules), **jit_kwargs)(key)


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
    """[batch, time] arrays: batch split as the rules say, time whole."""
    return NamedSharding(mesh, P(spec(("batch",), rules)[0], None))


def shard_batch(local_batch, sharding: NamedSharding):
    """A tree of this process's [local_batch, T] numpy arrays -> global jax.Arrays laid out as
    `sharding` (from `batch_sharding`). The rows must split over the batch-sharded devices:
    `checks.check_batch_divisible` says so, with the fix, when a run is resolved."""
    def one(a):
        a = np.asarray(a)
        global_shape = (a.shape[0] * jax.process_count(), *a.shape[1:])
        return jax.make_array_from_process_local_data(sharding, a, global_shape)

    return jax.tree.map(one, local_batch)
