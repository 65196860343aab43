"""Where a run's arrays live: its mesh and rules, resolved and checked once, and the shardings
of its train state and batches, derived once from the state's shapes."""
import dataclasses

import jax
from jax.sharding import NamedSharding

from headwise import parallel
from headwise.model import ModelConfig

from .config import RunConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """A run's device mesh, its rules table (logical axis -> mesh axes) and the table's name."""

    mesh: jax.sharding.Mesh
    rules: tuple
    strategy: str


def resolve_run(cfg: RunConfig, devices=None) -> Layout:
    """The mesh over `devices` (default: all of them) and its rules, with every divisibility
    rule of the config against that mesh checked here, once, before anything compiles."""
    mesh = parallel.make_mesh(cfg.mesh, devices)
    rules, strategy = parallel.resolve(cfg.mesh, mesh)
    parallel.check_divisible(cfg.model, mesh, rules, cfg.train.batch_size, cfg.train.grad_accum)
    return Layout(mesh, rules, strategy)


@dataclasses.dataclass(frozen=True)
class StateShardings:
    """The train state's shapes with their shardings (what a checkpoint is restored into), the
    shardings alone (what jit takes), and a [batch, time] array's sharding."""

    mesh: jax.sharding.Mesh
    rules: tuple
    abstract: dict  # jax.ShapeDtypeStruct leaves, each carrying its sharding
    state: dict  # NamedSharding leaves
    batch: NamedSharding

    @property
    def replicated(self) -> NamedSharding:
        return parallel.replicated(self.mesh)


def shard_state(abstract_state: dict, cfg: ModelConfig, layout: Layout) -> StateShardings:
    """Shardings for a train state whose shapes are `abstract_state` (from `jax.eval_shape`):
    params as the rules say, the optimizer state like its params, the rest replicated."""
    params = parallel.param_shardings(cfg, layout.mesh, layout.rules)
    state = parallel.state_shardings(abstract_state, params, layout.mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state)
    return StateShardings(layout.mesh, layout.rules, abstract, state,
                          parallel.batch_sharding(layout.mesh, layout.rules))
