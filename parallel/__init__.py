"""Sharding: meshes, logical-axis rules, shardings, multi-host start-up.

A strategy is a table (see `rules.RULES`) from the model's logical axis names to the mesh axes
(`mesh.AXES`); everything else here is the same code for every strategy. Nothing here knows
about training: it shards whatever trees and functions it is handed.
"""
from .checks import (batch_devices, check_batch_divisible, check_divisible, check_mesh_used,
                     check_params_divisible)
from .decode import generate_sharded
from .mesh import AXES, make_mesh, mesh_shape
from .rules import RULES, as_rules, get_rules, resolve, spec, strategy_for, under_rules
from .shardings import (batch_sharding, follow_params, init_sharded, param_shardings,
                        param_specs_tree, replicated, shard_batch, state_shardings)

__all__ = [
    "AXES", "RULES", "make_mesh", "mesh_shape", "get_rules", "as_rules", "resolve", "spec",
    "strategy_for", "under_rules", "param_specs_tree", "param_shardings", "state_shardings",
    "follow_params", "replicated", "init_sharded", "batch_sharding", "shard_batch",
    "batch_devices", "check_divisible", "check_params_divisible", "check_batch_divisible",
    "check_mesh_used", "generate_sharded",
]
