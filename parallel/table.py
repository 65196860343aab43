"""The sharding table: every parameter's logical axes, mesh sharding and bytes per device."""
import math

import jax
import numpy as np

from headwise.model import ModelConfig, ParamSpec, param_specs

from .checks import axis_size
from .rules import spec


def shardings_table(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules, strategy: str) -> str:
    """One row per parameter, then the totals."""
    item = np.dtype(cfg.param_dtype).itemsize
    leaves = jax.tree_util.tree_flatten_with_path(
        param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    rows, total, per_device = [], 0, 0
    for path, param in leaves:
        pspec = tuple(spec(param.axes, rules))
        pspec += (None,) * (len(param.shape) - len(pspec))
        local = tuple(d // axis_size(mesh, e) for d, e in zip(param.shape, pspec))
        total += math.prod(param.shape) * item
        per_device += math.prod(local) * item
        name = "/".join(str(k.key) for k in path)
        rows.append((name, str(param.axes), str(pspec), str(local),
                     f"{math.prod(local) * item:,}"))
    header = ("parameter", "logical axes", "mesh sharding", "per-device shape", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    fmt = lambda r: "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [f"mesh {dict(mesh.shape)}, strategy {strategy}, params in {cfg.param_dtype}", "",
             fmt(header), *map(fmt, rows), "",
             f"params: {total:,} bytes in all, {per_device:,} bytes per device "
             f"({total / max(per_device, 1):.2f}x smaller than one copy)"]
    return "\n".join(lines)
