"""The encoder-decoder: an encoder of bidirectional blocks reads the source; the decoder's blocks
(the same `block`) cross-attend to it. Forward pass, loss, and greedy decoding with a KV cache."""
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .cross_attention import source_keys_values
from .decode import init_cache
from .logical import constrain
from .sampling import greedy
from .loss import masked_mean, target_nll
from .transformer import _cast, check_ids, check_tokens, embed, norm, run_blocks, unembed


def check_source(source_BS, cfg: ModelConfig, source_mask_BS=None) -> None:
    """Host-side checks, before anything compiles: an encoder to read it, rank, length, ids."""
    if not cfg.n_encoder_layers:
        raise ValueError("ModelConfig.n_encoder_layers is 0: this model has no encoder to read "
                         "a source; set n_encoder_layers > 0 (or call forward without one)")
    if source_BS is None:
        raise ValueError(f"ModelConfig.n_encoder_layers={cfg.n_encoder_layers}: this model "
                         f"reads a source; give source_BS (token ids, [batch, positions])")
    if jnp.ndim(source_BS) != 2:
        raise ValueError(f"source must be [batch, source positions], got shape "
                         f"{jnp.shape(source_BS)}")
    S = jnp.shape(source_BS)[1]
    if S > cfg.source_context:
        raise ValueError(f"source has {S} positions but the model reads at most "
                         f"{cfg.source_context} (ModelConfig.source_length): shorten the source "
                         f"or raise source_length")
    if source_mask_BS is not None and jnp.shape(source_mask_BS) != jnp.shape(source_BS):
        raise ValueError(f"source_mask has shape {jnp.shape(source_mask_BS)} but source has "
                         f"{jnp.shape(source_BS)}: give one True/False per source token")
    check_ids(source_BS, cfg, "source")


def _mask(source_BS, source_mask_BS) -> jax.Array:
    """[B, S] booleans, True for a real source token (all of them when no mask is given)."""
    if source_mask_BS is None:
        return jnp.ones(jnp.shape(source_BS), bool)
    return jnp.asarray(source_mask_BS, bool)


def encode(params: dict, source_BS, cfg: ModelConfig, source_mask_BS=None, *,
           inspect: bool = False):
    """(memory_BSD, seen): the source through the encoder's blocks, each token attending to
    every real source token (before and after it; padding hidden), then the encoder's final
    norm. Token vectors come from the one shared embedding; positions from the encoder's own."""
    mask_BS = _mask(source_BS, source_mask_BS)
    x_BSD = jnp.take(params["embed"]["token"], source_BS, axis=0)
    if cfg.position == "learned":
        x_BSD = x_BSD + params["encoder"]["position"][: x_BSD.shape[1]]
    x_BSD, _, seen = run_blocks(params["encoder"], x_BSD.astype(cfg.dtype), cfg, causal=False,
                                mask_BTS=mask_BS[:, None, :], inspect=inspect)
    return norm(params["encoder"]["final_norm"], x_BSD, cfg), seen


def encoded_source(params: dict, memory_BSD: jax.Array, source_mask_BS, cfg: ModelConfig) -> dict:
    """What every decoder block cross-attends to, computed once per source: each layer's keys
    and values {"key", "value"}: [L, B, S, N, H], and "mask" [B, S]."""
    layers = _cast(params["blocks"]["cross_attention"], cfg.dtype)
    kv = jax.vmap(source_keys_values, in_axes=(0, None))(layers, memory_BSD)
    return {**kv, "mask": _mask(memory_BSD[..., 0], source_mask_BS)}


def _decoded(params: dict, source_BS, tokens_BT, cfg: ModelConfig, source_mask_BS, inspect: bool):
    """The decoder's last block's output [B, T, D], and what the encoder's and the decoder's
    blocks saw."""
    check_tokens(tokens_BT, cfg)
    check_source(source_BS, cfg, source_mask_BS)
    memory_BSD, encoder_seen = encode(params, source_BS, cfg, source_mask_BS, inspect=inspect)
    source = encoded_source(params, memory_BSD, source_mask_BS, cfg)
    x_BTD, _, seen = run_blocks(params, embed(params, tokens_BT, cfg), cfg, source=source,
                                inspect=inspect)
    return x_BTD, encoder_seen, seen


def forward_encoder_decoder(params: dict, source_BS, tokens_BT, cfg: ModelConfig, *,
                            source_mask_BS=None, return_patterns: bool = False):
    """Logits [B, T, V] of the decoder over `tokens_BT` (each position sees the target tokens
    up to itself and the whole source). With `return_patterns`, also {"encoder": [B, Le, N, S,
    S], "self": [B, L, N, T, T], "cross": [B, L, N, T, S]}. `source_mask_BS` is False at a
    ragged source's padding."""
    x_BTD, encoder_seen, seen = _decoded(params, source_BS, tokens_BT, cfg, source_mask_BS,
                                         return_patterns)
    logits_BTV = constrain(unembed(params, x_BTD, cfg), ("batch", "seq", "vocab"))
    if not return_patterns:
        return logits_BTV
    batch_first = lambda a: jnp.moveaxis(a, 0, 1)
    return logits_BTV, {"encoder": batch_first(encoder_seen["patterns"]),
                        "self": batch_first(seen["patterns"]),
                        "cross": batch_first(seen["cross_patterns"])}


def encoder_decoder_loss(params: dict, source_BS, inputs_BT, targets_BT, cfg: ModelConfig, *,
                         source_mask_BS=None, target_mask_BT=None) -> jax.Array:
    """Mean next-token cross-entropy of the targets given the source (nats), over the target
    positions where `target_mask_BT` is true (all, if None)."""
    check_tokens(targets_BT, cfg, "targets")
    x_BTD, _, _ = _decoded(params, source_BS, inputs_BT, cfg, source_mask_BS, False)
    return masked_mean(target_nll(params, x_BTD, targets_BT, cfg), target_mask_BT)


def greedy_decode(params: dict, source_BS, cfg: ModelConfig, *, start_token: int,
                  max_len: int, source_mask_BS=None):
    """(tokens [B, max_len], logits [B, max_len, V]): each row from `start_token`, the likeliest
    token at every step. The source is encoded, and each layer's cross-attention keys and values
    made, once; the decoder's self-attention reads a KV cache of max_len slots, one token per
    step. Rows run all max_len steps: the caller cuts each at its stop token."""
    if not 0 < max_len <= cfg.context_length:
        raise ValueError(f"max_len={max_len} must be in 1..ModelConfig.context_length="
                         f"{cfg.context_length}")
    check_source(source_BS, cfg, source_mask_BS)
    memory_BSD, _ = encode(params, source_BS, cfg, source_mask_BS)
    source = encoded_source(params, memory_BSD, source_mask_BS, cfg)
    B = jnp.shape(source_BS)[0]

    def step(carry, position):
        token_B, cache = carry
        positions_B1 = jnp.full((B, 1), position)
        x_B1D, cache, _ = run_blocks(params, embed(params, token_B[:, None], cfg, positions_B1),
                                     cfg, positions_BT=positions_B1, cache=cache, source=source)
        logits_BV = unembed(params, x_B1D[:, 0], cfg)
        next_B = greedy(logits_BV)
        return (next_B, cache), (next_B, logits_BV)

    start = (jnp.full((B,), start_token, jnp.int32), init_cache(cfg, B, max_len))
    _, (tokens_TB, logits_TBV) = jax.lax.scan(step, start, jnp.arange(max_len))
    return tokens_TB.T, jnp.moveaxis(logits_TBV, 0, 1)
