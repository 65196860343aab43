"""The train and eval steps jitted with shardings: state donated, metrics replicated."""
import functools

import flax.linen as nn
import jax

from headwise.model import ModelConfig, loss
from headwise.train.step import train_step

from .checks import check_mesh_used, check_params_divisible
from .rules import as_rules
from .shardings import batch_sharding, param_shardings, replicated, state_shardings


def under_rules(fn, mesh: jax.sharding.Mesh, rules):
    """`fn` traced with the rules and mesh in context, so the model's named activations
    (model.logical.constrain) are sharded as the rules say."""
    rules = as_rules(rules)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def _batch_tree(mesh, rules) -> dict:
    sharding = batch_sharding(mesh, rules)
    return {"inputs": sharding, "targets": sharding}


def make_sharded_train_step(cfg: ModelConfig, optimizer, schedule, mesh: jax.sharding.Mesh,
                            rules, grad_accum: int = 1, **jit_kwargs):
    """`train.step.train_step` under jit with in/out shardings; the state is donated."""
    check_mesh_used(mesh, rules)
    check_params_divisible(cfg, mesh, rules)
    state_sh = state_shardings(cfg, optimizer, mesh, rules)
    step = functools.partial(train_step, cfg=cfg, optimizer=optimizer, schedule=schedule,
                             grad_accum=grad_accum)
    return jax.jit(under_rules(step, mesh, rules), donate_argnums=0,
                   in_shardings=(state_sh, _batch_tree(mesh, rules)),
                   out_shardings=(state_sh, replicated(mesh)), **jit_kwargs)


def make_sharded_eval_step(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules, **jit_kwargs):
    """Mean loss of a sharded batch under sharded params."""
    evaluate = lambda params, batch: loss(params, batch["inputs"], batch["targets"], cfg)
    return jax.jit(under_rules(evaluate, mesh, rules),
                   in_shardings=(param_shardings(cfg, mesh, rules), _batch_tree(mesh, rules)),
                   out_shardings=replicated(mesh), **jit_kwargs)
