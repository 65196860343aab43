"""The sharding table: every parameter's logical axes, mesh sharding and bytes per device."""
import math

import jax
import numpy as np

from headwise.model import ModelConfig, param_axes, param_shapes

from .rules import spec


def _per_device_shape(shape, pspec, mesh) -> tuple:
    sizes = [math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ()))
             for e in tuple(pspec) + (None,) * (len(shape) - len(pspec))]
    return tuple(d // n for d, n in zip(shape, sizes))


def shardings_table(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules, strategy: str) -> str:
    """One row per parameter, then the totals."""
    item = np.dtype(cfg.param_dtype).itemsize
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(a, (int, str, type(None))) for a in x)
    axes = jax.tree_util.tree_flatten_with_path(param_axes(cfg), is_leaf=is_leaf)[0]
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=is_leaf)
    rows, total, per_device = [], 0, 0
    for (path, logical), shape in zip(axes, shapes):
        pspec = spec(logical, rules)
        local = _per_device_shape(shape, pspec, mesh)
        total += math.prod(shape) * item
        per_device += math.prod(local) * item
        name = "/".join(str(k.key) for k in path)
        rows.append((name, str(tuple(logical)), str(tuple(pspec)), str(local),
                     f"{math.prod(local) * item:,}"))
    header = ("parameter", "logical axes", "mesh sharding", "per-device shape", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    fmt = lambda r: "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [f"mesh {dict(mesh.shape)}, strategy {strategy}, params in {cfg.param_dtype}", "",
             fmt(header), *map(fmt, rows), "",
             f"params: {total:,} bytes in all, {per_device:,} bytes per device "
             f"({total / max(per_device, 1):.2f}x smaller than one copy)"]
    return "\n".join(lines)
