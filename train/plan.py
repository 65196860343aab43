"""`headwise plan`: a run config, a mesh and a hardware name in; one device's share of a step out."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from headwise import parallel
from headwise.model import param_axes, param_shapes
from headwise.parallel.hardware import HARDWARE, get_hardware
from headwise.parallel.plan import Plan, abstract_mesh, check_fits, format_plan, plan_step

from .config import RunConfig
from .optim import make_optimizer


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a model preset (gpt3-175b, gpt2-small, ...) instead "
                        "of --config's model")
    parser.add_argument("--hardware", required=True,
                        help=f"the device the plan is for: {', '.join(HARDWARE)}")
    parser.add_argument("--batch", type=int, help="global sequences per step (default: "
                        "train.batch_size)")
    parser.add_argument("--context", type=int, help="tokens per sequence (default: "
                        "model.context_length)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")


def optimizer_moments(cfg: RunConfig) -> float:
    """The optimizer's state per parameter, in parameters (AdamW: 2), from the run's own
    optimizer (jax.eval_shape: nothing allocated)."""
    dtype = jnp.dtype(cfg.model.param_dtype)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg.model),
                          is_leaf=lambda x: isinstance(x, tuple))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, param_axes(cfg.model))
    state = jax.eval_shape(optimizer.init, params)
    size = lambda tree: sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))
    return float(size(state)) / float(size(params))


def mesh_sizes(cfg: RunConfig, devices: int | None) -> dict:
    """The mesh axes' sizes; -1 (the remaining devices) only with --devices N."""
    sizes = {a: getattr(cfg.mesh, a) for a in parallel.AXES}
    if -1 in sizes.values():
        if devices is None and list(sizes.values()).count(-1) == 1 and all(
                s in (1, -1) for s in sizes.values()):
            devices = 1  # no --mesh at all: one device
        if devices is None:
            raise ValueError("--mesh: give every axis a size for a plan (no -1), or --devices N "
                             "for -1 to take the rest")
        parallel.mesh_shape(cfg.mesh, devices)  # the same checks a run makes
        return dict(zip(parallel.AXES, parallel.mesh_shape(cfg.mesh, devices)))
    return sizes


def plan_run(cfg: RunConfig, hardware: str, batch: int | None = None,
             context: int | None = None, devices: int | None = None) -> Plan:
    """The plan of one training step of this run on `hardware`."""
    hw = get_hardware(hardware)
    sizes = mesh_sizes(cfg, devices)
    rules, strategy = parallel.resolve(cfg.mesh, abstract_mesh(sizes))
    batch = cfg.train.batch_size if batch is None else batch
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    return plan_step(cfg.model, sizes, rules, hw, batch, context, strategy,
                     optimizer_moments(cfg))


def plan_text(cfg: RunConfig, args) -> str:
    """What `headwise plan` prints: the plan as text (or JSON), and why it cannot run if so."""
    p = plan_run(cfg, args.hardware, args.batch, args.context, args.devices)
    if args.json:
        return json.dumps(p.as_dict(), indent=1)
    problem = check_fits(p)
    return format_plan(p) + ("" if problem is None else f"\n\n{problem}")
