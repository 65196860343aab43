"""Cross-attention in the stored layout: queries from the sequence being written, keys and values
from an encoded source, projected once per source (training and every decoding step share them)."""
import jax
import jax.numpy as jnp

from .attention import attend, heads_to_residual
from .config import ModelConfig
from .masks import Visible


def _heads(x_BTD: jax.Array, layer: dict, names: tuple[str, ...]) -> jax.Array:
    """x through the named [D, N, H] matrices (and biases) in ONE matmul: [B, T, len(names), N, H]."""
    B, T, D = x_BTD.shape
    _, N, H = layer[names[0]].shape
    y = x_BTD.reshape(B * T, D) @ jnp.concatenate(
        [layer[n].reshape(D, N * H) for n in names], axis=1)
    if f"{names[0]}_bias" in layer:
        y = y + jnp.concatenate([layer[f"{n}_bias"].reshape(N * H) for n in names])
    return y.reshape(B, T, len(names), N, H)


def source_keys_values(layer: dict, memory_BSD: jax.Array) -> dict:
    """One layer's keys and values of the encoded source, {"key", "value"}: [B, S, N, H]."""
    kv = _heads(memory_BSD, layer, ("key", "value_down"))
    return {"key": kv[:, :, 0], "value": kv[:, :, 1]}


def cross_attention_layer(layer: dict, x_BTD: jax.Array, source: dict, cfg: ModelConfig,
                          inspect: bool = False):
    """(delta_BTD, seen): every query may read every real source token (no causal rule; the
    source's padding, False in source["mask"] [B, S], is hidden). `source` holds this layer's
    "key" and "value" [B, S, N, H] from `source_keys_values`. No RoPE here: a rotation by
    target position minus source position would relate two unrelated sequences' positions
    (the encoder and decoder each place their own tokens). `seen` as attention_layer's."""
    q_BTNH = _heads(x_BTD, layer, ("query",))[:, :, 0]
    visible = Visible(None, causal=False, mask_BTS=source["mask"][:, None, :])
    out_BTNH, patterns = attend(q_BTNH, source["key"], source["value"], visible, cfg, inspect)
    seen = {"patterns": patterns, "head_outputs": out_BTNH} if inspect else None
    return heads_to_residual(layer, out_BTNH), seen
