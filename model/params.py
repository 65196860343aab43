"""Parameter specs (shape, logical axes, initializer): the one source of truth for the tree."""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from .compiler import compiler_options
from .config import ModelConfig

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, a logical axis name per dimension, and how to initialize it."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Initializer

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def normal(std: float) -> Initializer:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def _norm_specs(cfg: ModelConfig, prefix: tuple) -> dict:
    axes = tuple(["layers"] * len(prefix)) + ("embed",)
    shape = prefix + (cfg.d_model,)
    specs = {"scale": ParamSpec(shape, axes, ones)}
    if cfg.norm == "layernorm" and cfg.bias:  # bias=False drops every bias, as in nanoGPT
        specs["bias"] = ParamSpec(shape, axes, zeros)
    return specs


def _attention_specs(cfg: ModelConfig, L: int) -> dict:
    """One attention layer per block, self or cross: the same matrices either way."""
    D, N, H = cfg.d_model, cfg.n_heads, cfg.d_head
    # Heads stored [L, D, N, H] so a reshape to [D, N*H] (free) gives one wide matmul.
    inward = ("layers", "embed", "heads", "head_dim")
    specs = {name: ParamSpec((L, D, N, H), inward, normal(0.02))
             for name in ("query", "key", "value_down")}
    # GPT-2's scaling of the projections that write into the residual stream.
    residual_std = 0.02 / math.sqrt(2 * L)
    specs["value_up"] = ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"),
                                  normal(residual_std))
    if cfg.bias:
        for name in ("query", "key", "value_down"):
            specs[f"{name}_bias"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), zeros)
        specs["output_bias"] = ParamSpec((L, D), ("layers", "embed"), zeros)
    return specs


def _mlp_specs(cfg: ModelConfig, L: int) -> dict:
    D, F = cfg.d_model, cfg.d_mlp
    specs = {"up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), normal(0.02)),
             "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"),
                               normal(0.02 / math.sqrt(2 * L)))}
    if cfg.activation == "swiglu":
        specs["gate"] = ParamSpec((L, D, F), ("layers", "embed", "mlp"), normal(0.02))
    if cfg.bias:
        specs["up_bias"] = ParamSpec((L, F), ("layers", "mlp"), zeros)
        specs["down_bias"] = ParamSpec((L, D), ("layers", "embed"), zeros)
        if cfg.activation == "swiglu":
            specs["gate_bias"] = ParamSpec((L, F), ("layers", "mlp"), zeros)
    return specs


def param_specs(cfg: ModelConfig) -> dict:
    """The parameter tree as ParamSpecs. Blocks are stacked on a leading `layers` axis."""
    V, C, D, L = cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.n_layers
    specs = {"embed": {"token": ParamSpec((V, D), ("vocab", "embed"), normal(0.02))}}
    if cfg.position == "learned":
        specs["embed"]["position"] = ParamSpec((C, D), (None, "embed"), normal(0.02))
    specs["blocks"] = _block_specs(cfg, L)
    specs["final_norm"] = _norm_specs(cfg, ())
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), normal(0.02))
    if cfg.n_encoder_layers:
        specs["encoder"] = _encoder_specs(cfg)
        # Between each decoder block's self-attention and its MLP: queries from the decoder,
        # keys and values from the encoder's output.
        specs["blocks"]["cross_attention_norm"] = _norm_specs(cfg, (L,))
        specs["blocks"]["cross_attention"] = _attention_specs(cfg, L)
    return specs


def _block_specs(cfg: ModelConfig, L: int) -> dict:
    return {"attention_norm": _norm_specs(cfg, (L,)), "attention": _attention_specs(cfg, L),
            "mlp_norm": _norm_specs(cfg, (L,)), "mlp": _mlp_specs(cfg, L)}


def _encoder_specs(cfg: ModelConfig) -> dict:
    """The encoder's own blocks and final norm (and source positions, if learned); it shares
    the decoder's token embedding (one vocabulary for source and target)."""
    specs = {"blocks": _block_specs(cfg, cfg.n_encoder_layers),
             "final_norm": _norm_specs(cfg, ())}
    if cfg.position == "learned":
        specs["position"] = ParamSpec((cfg.source_context, cfg.d_model), (None, "embed"),
                                      normal(0.02))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters: every spec's initializer with its own key, in `param_dtype`. One
    compiled program (per config), on the CPU at -O1: called eagerly, each initializer was a
    program of its own at -O2, and the tiny preset's took 5-7 s to compile (now 1.3-2)."""
    try:
        return _init_program(jax.default_backend())(cfg, key)
    except ValueError:  # inside a caller's jit or eval_shape (JAX takes compiler options only
        return _init_params(cfg, key)  # for a top-level program): traced into theirs


@functools.cache
def _init_program(platform: str):
    return jax.jit(_init_params, static_argnums=0, compiler_options=compiler_options(platform))


def _init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.unflatten(treedef, [s.init(k, s.shape, dtype) for s, k in zip(leaves, keys)])


def param_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter: same tree structure as `init_params`."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict:
    """The shape of every parameter, without allocating anything."""
    return jax.tree.map(lambda s: s.shape, param_specs(cfg), is_leaf=_is_spec)
