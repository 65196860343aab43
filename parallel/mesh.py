"""The device mesh: three named axes, sized from a MeshConfig."""
import math

import jax
import numpy as np
from jax.experimental import mesh_utils

# The one place the mesh axis names are spelled; configs, rules, checks and the CLI read them here.
AXES = DATA, FSDP, TENSOR = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
    """The AXES' sizes, with -1 resolved to the remaining devices."""
    sizes = [getattr(mesh_cfg, a) for a in AXES]
    given = ", ".join(f"mesh.{a}={s}" for a, s in zip(AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (the remaining devices), got {given}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ValueError(f"{given}: the fixed axes' product {fixed} does not divide the "
                             f"{n_devices} devices, so -1 has no whole size")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ValueError(f"{given}: {'*'.join(AXES)} = {math.prod(sizes)} but there are "
                         f"{n_devices} devices; make the product {n_devices} or set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A Mesh with axes AXES over `devices` (default: all of them)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:  # topology-aware order on TPU/GPU; a plain reshape elsewhere
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
    return jax.sharding.Mesh(grid, AXES)
