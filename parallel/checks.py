"""Host-side checks that fail with a clear message BEFORE anything is compiled."""
import math

import jax

from headwise.model import ModelConfig, param_specs

from .rules import RULES, as_rules, mesh_axes_used, spec

# Which ModelConfig field sets each logical axis: what the user would change.
FIELDS = {"vocab": "vocab_size", "embed": "d_model", "heads": "n_heads", "head_dim": "d_head",
          "mlp": "d_mlp", "layers": "n_layers", None: "context_length"}


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def axis_size(mesh: jax.sharding.Mesh, entry) -> int:
    """Devices one PartitionSpec entry splits a dimension over."""
    return math.prod(mesh.shape[a] for a in _names(entry))


def _axis_sizes(mesh, entry) -> str:
    """'data=2*fsdp=4': the mesh axes one PartitionSpec entry names, with their sizes."""
    return "*".join(f"{a}={mesh.shape[a]}" for a in _names(entry))


def _label(rules) -> str:
    if isinstance(rules, str):
        return f"strategy {rules}"
    names = [n for n, table in RULES.items() if table == tuple(rules)]
    return f"strategy {names[0]}" if names else "the given rules"


def check_mesh_used(mesh: jax.sharding.Mesh, rules) -> None:
    """A mesh axis bigger than 1 that the strategy never uses would make devices repeat work."""
    used = mesh_axes_used(rules)
    for name, size in mesh.shape.items():
        if size > 1 and name not in used:
            raise ValueError(f"mesh.{name}={size} but {_label(rules)} shards "
                             f"nothing over '{name}'; set mesh.{name}=1 or pick a strategy "
                             f"that uses it")


def check_params_divisible(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules) -> None:
    """Every parameter dimension divides evenly over the mesh axes its logical name maps to."""
    rules = as_rules(rules)
    leaves = jax.tree_util.tree_flatten_with_path(
        param_specs(cfg), is_leaf=lambda x: hasattr(x, "axes"))[0]
    for path, s in leaves:
        for dim, logical, entry in zip(s.shape, s.axes, spec(s.axes, rules)):
            n = axis_size(mesh, entry)
            if dim % n:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                field = FIELDS.get(logical, logical)
                raise ValueError(
                    f"ModelConfig.{field}={dim} is not divisible by mesh "
                    f"{_axis_sizes(mesh, entry)} (logical axis '{logical}' of parameter {name}): make {field} a multiple "
                    f"of {n}, or shrink that mesh axis, or use a strategy that does not shard "
                    f"'{logical}'")


def batch_devices(mesh: jax.sharding.Mesh, rules) -> int:
    return axis_size(mesh, spec(("batch",), rules)[0])


def check_batch_divisible(mesh: jax.sharding.Mesh, rules, batch_size: int,
                          grad_accum: int = 1) -> None:
    """Each micro-batch splits evenly over the devices the batch is sharded over."""
    entry = spec(("batch",), rules)[0]
    n = axis_size(mesh, entry)
    if batch_size % (n * grad_accum):
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by {_axis_sizes(mesh, entry) or '1'} "
            f"* train.grad_accum={grad_accum} = {n * grad_accum}: each of the {grad_accum} "
            f"micro-batches must split evenly over the {n} batch-sharded devices; make "
            f"batch_size a multiple of {n * grad_accum}")


def check_processes(mesh: jax.sharding.Mesh, rules, batch_size: int) -> None:
    """Each process loads its own contiguous rows of the batch, so the batch-sharded devices
    (and the batch) must split evenly over the processes."""
    n, p = batch_devices(mesh, rules), jax.process_count()
    if n % p or batch_size % p:
        axes = " or ".join(f"mesh.{a}" for a in _names(spec(("batch",), rules)[0]))
        raise ValueError(f"{p} processes cannot each feed their own rows: train.batch_size="
                         f"{batch_size} and the {n} batch-sharded devices must both divide by "
                         f"{p}; shard the batch over more devices ({axes})")


def check_divisible(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules, batch_size: int | None = None,
                    grad_accum: int = 1) -> None:
    """All of the above, each rule once: call it when a run is resolved, before compiling."""
    check_mesh_used(mesh, rules)
    check_params_divisible(cfg, mesh, rules)
    if batch_size is not None:
        check_batch_divisible(mesh, rules, batch_size, grad_accum)
        check_processes(mesh, rules, batch_size)
