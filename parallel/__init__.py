"""Sharding: meshes, logical-axis rules, shardings, multi-host start-up.

A strategy is a table (see `rules.RULES`) from the model's logical axis names to the mesh axes
('data', 'fsdp', 'tensor'); everything else here is the same code for every strategy.
"""
from .checks import (batch_devices, check_batch_divisible, check_divisible, check_mesh_used,
                     check_params_divisible)
from .decode import generate_sharded
from .mesh import AXES, make_mesh, mesh_shape
from .rules import RULES, as_rules, get_rules, resolve, spec, strategy_for
from .shardings import (batch_sharding, follow_params, init_sharded, init_sharded_state,
                        param_shardings, param_specs_tree, replicated, shard_batch,
                        state_shardings)
from .step import make_sharded_eval_step, make_sharded_train_step, under_rules

__all__ = [
    "AXES", "RULES", "make_mesh", "mesh_shape", "get_rules", "as_rules", "resolve", "spec", "strategy_for",
    "param_specs_tree", "param_shardings", "state_shardings", "follow_params", "replicated",
    "init_sharded", "init_sharded_state", "batch_sharding", "shard_batch", "batch_devices",
    "check_divisible", "check_params_divisible", "check_batch_divisible", "check_mesh_used",
    "make_sharded_train_step", "make_sharded_eval_step", "under_rules", "generate_sharded",
]
