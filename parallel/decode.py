"""Generation on a mesh: the prompts' batch and the KV cache split like the activations."""
import flax.linen as nn
import jax

from headwise.model import ModelConfig
from headwise.model.decode import as_prompts, generate

from .checks import batch_devices
from .rules import as_rules


def generate_sharded(params: dict, cfg: ModelConfig, prompts,
                     max_new_tokens: int, mesh: jax.sharding.Mesh, rules, **sampling):
    """`model.decode.generate` with params sharded by `rules` (e.g. from `init_sharded`): the
    cache is split over the batch axes and over heads (whole heads per tensor-parallel device).
    Prompts are padded with copies of the first one to a multiple of the batch-sharded devices;
    the copies' tokens are dropped."""
    rules, prompts = as_rules(rules), as_prompts(prompts)
    pad = -len(prompts) % batch_devices(mesh, rules)
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
        padded = prompts + prompts[:1] * pad
        new = generate(params, cfg, padded, max_new_tokens, **sampling)
    return new[:len(prompts)]
