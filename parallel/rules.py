"""Strategies as tables: logical axis name -> mesh axes. The model never names a mesh axis.

Rules are flax's format, an ordered tuple of (logical name, mesh axes) pairs. Earlier pairs win;
a logical name may appear twice as a fallback (a mesh axis is used at most once per array, and
a dimension takes the first free rule that names it).

`batch` goes to ('data', 'fsdp') in EVERY table: every device that is not a tensor-parallel
partner sees different sequences, so no mesh shape makes devices repeat work, and the batch
layout (hence the data loader) does not depend on the strategy. A strategy only decides how
the PARAMETERS are split; `data` is the axis they are replicated over.
"""
import functools

import flax.linen as nn
import jax

from .mesh import DATA, FSDP, TENSOR

BATCH_RULES = (("batch", (DATA, FSDP)),)
# FSDP: every matrix is split along the model width. Arrays with no `embed` axis (MLP and
# per-head biases) fall back to `mlp`, then `head_dim`, so nothing sizeable is replicated.
FSDP_RULES = (("embed", FSDP), ("mlp", FSDP), ("head_dim", FSDP))
# Tensor parallel: each device holds whole heads (query/key/value columns, value_up rows), the
# MLP's up columns and down rows, and a slice of the vocabulary (embedding rows, logit columns).
TP_RULES = (("heads", TENSOR), ("mlp", TENSOR), ("vocab", TENSOR))

RULES = {
    "dp": BATCH_RULES,
    "fsdp": BATCH_RULES + FSDP_RULES,
    "tp": BATCH_RULES + TP_RULES,
    "fsdp+tp": BATCH_RULES + TP_RULES + FSDP_RULES,
    # The same table: on a mesh with data > 1 and fsdp > 1, params are sharded over fsdp and
    # replicated over data (hybrid sharding); the mesh, not the table, makes the difference.
    "dp+fsdp+tp": BATCH_RULES + TP_RULES + FSDP_RULES,
}


def strategy_for(mesh: jax.sharding.Mesh) -> str:
    """The strategy that uses exactly the mesh axes larger than 1 (what 'auto' means)."""
    fsdp, tensor = mesh.shape[FSDP] > 1, mesh.shape[TENSOR] > 1
    if fsdp and tensor:
        return "dp+fsdp+tp" if mesh.shape[DATA] > 1 else "fsdp+tp"
    return "fsdp" if fsdp else "tp" if tensor else "dp"


def get_rules(strategy: str):
    """The rules table of a named strategy."""
    if strategy not in RULES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of: "
                         f"{', '.join(RULES)}")
    return RULES[strategy]


def resolve(mesh_cfg, mesh: jax.sharding.Mesh) -> tuple[tuple, str]:
    """(rules table, its name) from a MeshConfig: its own `rules`, else its named strategy,
    'auto' meaning the one that uses exactly the mesh axes larger than 1."""
    if mesh_cfg.rules:
        return tuple(mesh_cfg.rules), "the config's rules"
    name = strategy_for(mesh) if mesh_cfg.strategy == "auto" else mesh_cfg.strategy
    return get_rules(name), name


def as_rules(rules):
    """A rules table from a table or a strategy name."""
    return get_rules(rules) if isinstance(rules, str) else tuple(rules)


def spec(axes: tuple, rules) -> jax.sharding.PartitionSpec:
    """Logical axis names of one array -> its PartitionSpec under `rules`."""
    return nn.logical_to_mesh_axes(tuple(axes), as_rules(rules))


def mesh_axes_used(rules) -> set[str]:
    used = set()
    for _, mesh_axes in as_rules(rules):
        used.update((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ())
    return used


def under_rules(fn, mesh: jax.sharding.Mesh, rules):
    """`fn` traced with the rules and mesh in context, so the model's named activations
    (model.logical.constrain) are sharded as the rules say."""
    rules = as_rules(rules)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced
