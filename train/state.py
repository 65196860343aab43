"""The train state, shape first: its shapes once, then created or restored into its shardings."""
import functools

import jax
import optax

from headwise.model import ModelConfig, init_params
from headwise.model.compiler import compiler_options

from . import checkpoint
from .step import init_state


def _fresh_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, key: jax.Array) -> dict:
    """The state a run starts from: params from one half of the run's key, the other half kept
    in the state."""
    key, init_key = jax.random.split(key)
    return init_state(init_params(cfg, init_key), optimizer, key)


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation) -> dict:
    """The train state's shapes and dtypes (`jax.eval_shape`: nothing computed or allocated)."""
    return jax.eval_shape(functools.partial(_fresh_state, cfg, optimizer), jax.random.key(0))


def state_initializer(cfg: ModelConfig, optimizer, shardings: dict, **jit_kwargs):
    """`key -> fresh state`, jitted to be born sharded as `shardings` says (no device ever
    holds the whole tree) and compiled as the steps are: on the CPU at -O1, where the default
    model's initializers compiled in 1.6-2.4 s instead of 5.4-5.8."""
    platform = next(iter(jax.tree.leaves(shardings)[0].device_set)).platform
    jit_kwargs.setdefault("compiler_options", compiler_options(platform))
    return jax.jit(functools.partial(_fresh_state, cfg, optimizer), out_shardings=shardings,
                   **jit_kwargs)


def create_state(cfg: ModelConfig, optimizer, seed: int, shardings: dict, **jit_kwargs) -> dict:
    """A fresh state, sharded, from the run's seed."""
    return state_initializer(cfg, optimizer, shardings, **jit_kwargs)(jax.random.key(seed))


def restore_or_create(cfg: ModelConfig, optimizer, seed: int, shardings, manager, *,
                      fingerprint: dict | None = None, say=print) -> dict:
    """The newest checkpoint in `manager` that reads back whole (older ones if the newest are
    damaged), restored straight into `shardings` (a layout.StateShardings; whatever mesh saved
    it), or a fresh state born sharded."""
    found = checkpoint.restore_newest_readable(manager, shardings.abstract,
                                               fingerprint=fingerprint, say=say)
    if found is not None:
        return found[0]
    return create_state(cfg, optimizer, seed, shardings.state)
