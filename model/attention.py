"""Attention as the explanation tells it (one head, then many), and the batched kernels the model runs."""
import jax
import jax.numpy as jnp

from .chunked import attend_chunked
from .config import ModelConfig
from .linear import linear, linears
from .logical import constrain
from .masks import MASKED, Visible, causal_mask

# The key/value cache of every layer, [L, B, N, S, H]: split like the activations, whole heads
# per device. Heads before slots, as the attention dots read them: no transpose per step.
CACHE_AXES = ("layers", "batch", "heads", None, "head_dim")


# --- Where a vector points ------------------------------------------------------------------

def rope(x_TH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding: rotate pairs (i, i + H/2) of each vector by position * freq_i.
    `positions` broadcasts against `x.shape[:-1]`, so any leading axes work."""
    half = x_TH.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_T[..., None].astype(jnp.float32) * inv_freq
    cos_TH, sin_TH = (jnp.concatenate([f(angles)] * 2, -1) for f in (jnp.cos, jnp.sin))
    return _rotate(x_TH, cos_TH, sin_TH)


@jax.custom_vjp
def _rotate(x_TH, cos_TH, sin_TH):
    """x cos + (-x2, x1) sin, in f32. A rotation's gradient is the rotation back (sin negated):
    one pass, where autodiff of the pairs' swap made pads, adds and transposes, a fifth of an
    attention layer's CPU gradient (issue 13). Positions are not differentiated."""
    half = x_TH.shape[-1] // 2
    x32 = x_TH.astype(jnp.float32)
    swapped_TH = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos_TH + swapped_TH * sin_TH).astype(x_TH.dtype)


def _rotate_fwd(x_TH, cos_TH, sin_TH):
    return _rotate(x_TH, cos_TH, sin_TH), (cos_TH, sin_TH)


def _rotate_bwd(saved, dy_TH):
    cos_TH, sin_TH = saved
    return _rotate(dy_TH, cos_TH, -sin_TH), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


# --- The explanation's view: one head on one sequence ------------------------------------------

def attention_scores(q_TH: jax.Array, k_SH: jax.Array) -> jax.Array:
    """Every query against every key: q·k / sqrt(H), so scores do not grow with head width."""
    return (q_TH @ k_SH.T) / jnp.sqrt(jnp.float32(q_TH.shape[-1])).astype(q_TH.dtype)


def attention_pattern(scores_TS: jax.Array, mask_TS: jax.Array | None = None) -> jax.Array:
    """Softmax over keys. Row t holds how much query t attends to each key: each row sums to 1
    and masked entries are exactly 0. (The explanation draws keys as rows, so there its
    columns sum to 1: the same pattern, transposed.)"""
    scores_TS = scores_TS.astype(jnp.float32)
    if mask_TS is not None:
        scores_TS = jnp.where(mask_TS, scores_TS, MASKED)
    return jax.nn.softmax(scores_TS, axis=-1)


def weigh_values(q_TH, k_SH, v_SH, mask_TS=None):
    """The heart of a head: its pattern, and the values weighted by it: (out_TH, pattern_TS)."""
    pattern_TS = attention_pattern(attention_scores(q_TH, k_SH), mask_TS)
    return pattern_TS.astype(v_SH.dtype) @ v_SH, pattern_TS


def _project(x_TD, head, name):
    y = x_TD @ head[name]
    bias = head.get(f"{name}_bias")
    return y if bias is None else y + bias


def attention_head(head: dict, x_TD: jax.Array, mask_TS: jax.Array | None = None,
                   source_SD: jax.Array | None = None, *, rope_theta: float | None = None):
    """One head: (delta_TD, pattern_TS). `head` has query, key, value_down [D, H] and value_up
    [H, D] (and optional `*_bias`). Queries come from x; keys and values from `source_SD`
    (cross-attention) or from x itself (self-attention)."""
    source_SD = x_TD if source_SD is None else source_SD
    q_TH = _project(x_TD, head, "query")
    k_SH = _project(source_SD, head, "key")
    if rope_theta is not None:
        q_TH = rope(q_TH, jnp.arange(q_TH.shape[0]), rope_theta)
        k_SH = rope(k_SH, jnp.arange(k_SH.shape[0]), rope_theta)
    out_TH, pattern_TS = weigh_values(q_TH, k_SH, _project(source_SD, head, "value_down"), mask_TS)
    return out_TH @ head["value_up"], pattern_TS


def multi_head_attention(heads: dict, x_TD: jax.Array, mask_TS: jax.Array | None = None,
                         source_SD: jax.Array | None = None, *, rope_theta: float | None = None):
    """All heads in parallel (`jax.vmap` over the leading heads axis of every matrix), their
    proposed changes summed: (delta_TD, patterns_NTS)."""
    one_head = lambda head: attention_head(head, x_TD, mask_TS, source_SD, rope_theta=rope_theta)
    deltas_NTD, patterns_NTS = jax.vmap(one_head)(heads)
    return deltas_NTD.sum(0), patterns_NTS


def output_matrix(heads: dict) -> jax.Array:
    """All heads' value_up matrices [N, H, D] stacked into the [N*H, D] output matrix."""
    N, H, D = heads["value_up"].shape
    return heads["value_up"].reshape(N * H, D)


def heads_view(layer: dict) -> dict:
    """One layer's stored attention params ([D, N, H] layout) as the explanation's per-head view
    ([N, D, H]); per-head biases are already [N, H]. The block-level output bias is dropped."""
    view = {name: jnp.moveaxis(layer[name], 1, 0) for name in ("query", "key", "value_down")}
    view["value_up"] = layer["value_up"]
    view.update({f"{n}_bias": layer[f"{n}_bias"] for n in ("query", "key", "value_down")
                 if f"{n}_bias" in layer})
    return view


# --- The batched kernels: q_BTNH, k_BSNH, v_BSNH -> out_BTNH (and the patterns, if made) -------

def attend_reference(q_BTNH, k_BSNH, v_BSNH, visible: Visible):
    """The explanation's one head (`weigh_values`), vmapped over heads, then over the batch."""
    B, T, _, _ = q_BTNH.shape
    heads = jax.vmap(weigh_values, in_axes=(1, 1, 1, None), out_axes=(1, 0))
    out_BTNH, pattern_BNTS = jax.vmap(heads)(q_BTNH, k_BSNH, v_BSNH,
                                             visible.allowed(B, T, k_BSNH.shape[1]))
    return out_BTNH, pattern_BNTS


def attend_fused(q_BTNH, k_BSNH, v_BSNH, visible: Visible):
    """Scores, pattern and weighted values as three einsums."""
    B, T, _, H = q_BTNH.shape
    scale = 1.0 / jnp.sqrt(jnp.float32(H))
    scores = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH).astype(jnp.float32) * scale
    mask_BTS = visible.allowed(B, T, k_BSNH.shape[1])
    pattern_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], scores, MASKED), axis=-1)
    out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", pattern_BNTS.astype(v_BSNH.dtype), v_BSNH)
    return out_BTNH, pattern_BNTS


def _flash_causal(q_BTNH, k_BSNH, v_BSNH) -> jax.Array:
    """Causal attention by cuDNN's fused (flash) kernel where it runs: an NVIDIA GPU and 16-bit
    inputs; on the CPU by `_causal_cpu`; else by XLA (JAX's own default everywhere)."""
    if jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):  # a shape cuDNN declines
            pass
    if jax.default_backend() == "cpu":
        return _causal_cpu(q_BTNH, k_BSNH, v_BSNH)
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True)


@jax.custom_vjp
def _causal_cpu(q_BTNH, k_BSNH, v_BSNH):
    """What jax.nn.dot_product_attention computes (scores and softmax in f32), with the
    backward written out below."""
    return _causal_cpu_fwd(q_BTNH, k_BSNH, v_BSNH)[0]


def _causal_cpu_fwd(q_BTNH, k_BSNH, v_BSNH):
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BTNH.shape[-1]))
    scores = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH,
                        preferred_element_type=jnp.float32) * scale
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    pattern_BNTS = jax.nn.softmax(jnp.where(causal_mask(T, S), scores, MASKED), axis=-1)
    out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", pattern_BNTS.astype(v_BSNH.dtype), v_BSNH)
    return out_BTNH, (q_BTNH, k_BSNH, v_BSNH, pattern_BNTS, out_BTNH)


def _causal_cpu_bwd(saved, dout_BTNH):
    """The softmax's gradient takes sum_s p_s dp_s as dout . out (over H, as flash attention
    does), not as a sum over keys: XLA:CPU's reductions over the [B, N, T, S] product were a
    tenth of the CPU gradient (issue 13)."""
    q_BTNH, k_BSNH, v_BSNH, p_BNTS, out_BTNH = saved
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BTNH.shape[-1]))
    dv_BSNH = jnp.einsum("BNTS,BTNH->BSNH", p_BNTS.astype(dout_BTNH.dtype), dout_BTNH)
    dp_BNTS = jnp.einsum("BTNH,BSNH->BNTS", dout_BTNH, v_BSNH, preferred_element_type=jnp.float32)
    delta_BNT = jnp.einsum("BTNH,BTNH->BNT", dout_BTNH.astype(jnp.float32),
                           out_BTNH.astype(jnp.float32))
    ds_BNTS = p_BNTS * (dp_BNTS - delta_BNT[..., None]) * scale
    dq_BTNH = jnp.einsum("BNTS,BSNH->BTNH", ds_BNTS.astype(k_BSNH.dtype), k_BSNH)
    dk_BSNH = jnp.einsum("BNTS,BTNH->BSNH", ds_BNTS.astype(q_BTNH.dtype), q_BTNH)
    return dq_BTNH.astype(q_BTNH.dtype), dk_BSNH.astype(k_BSNH.dtype), dv_BSNH


_causal_cpu.defvjp(_causal_cpu_fwd, _causal_cpu_bwd)


def attend_dot_product(q_BTNH, k_BSNH, v_BSNH, visible: Visible):
    """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU in bf16/fp16 (causal, no
    cache), XLA elsewhere."""
    B, T, _, _ = q_BTNH.shape
    S = k_BSNH.shape[1]
    if visible.causal and visible.positions_BT is None and visible.mask_BTS is None and T == S:
        return _flash_causal(q_BTNH, k_BSNH, v_BSNH), None
    mask = visible.allowed(B, T, S)[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask), None


# --- One attention layer, in the stored layout, for every path -----------------------------

KERNELS = {"reference": attend_reference, "fused": attend_fused,
           "chunked": attend_chunked, "dot_product": attend_dot_product}


def attend(q_BTNH, k_BSNH, v_BSNH, visible: Visible, cfg: ModelConfig,
           return_patterns: bool = False):
    """(out_BTNH, patterns_BNTS or None) by the kernel `cfg.attention` names. Patterns are a
    [B, N, T, S] array by nature: asking for them runs 'chunked' and 'dot_product' layers
    through the 'fused' kernel, which makes them (the others never build one)."""
    path = cfg.attention
    if return_patterns and path in ("chunked", "dot_product"):
        path = "fused"
    if path == "chunked":
        return attend_chunked(q_BTNH, k_BSNH, v_BSNH, visible, cfg.attention_chunk)
    return KERNELS[path](q_BTNH, k_BSNH, v_BSNH, visible)


def project_qkv(layer: dict, x_BTD: jax.Array, source_BSD: jax.Array | None = None):
    """q_BTNH, k_BSNH, v_BSNH: queries from x, keys and values from `source_BSD` (cross-
    attention) or x, by `linears`: a matmul per matrix, and their input's gradient as ONE matmul
    of the three gradients stacked on a new axis by the weights likewise stacked: under tensor
    parallelism a device's heads stay its own (a concatenation along the split N*H axis made XLA
    all-gather the weights in every layer, docs/scaling.md) and the gradient is all-reduced once."""
    def stacked(x, names):
        bs = tuple(layer[f"{n}_bias"] for n in names) if f"{names[0]}_bias" in layer else ()
        return linears(x, tuple(layer[n] for n in names), bs)

    if source_BSD is None:
        return stacked(x_BTD, ("query", "key", "value_down"))
    return stacked(x_BTD, ("query",)) + stacked(source_BSD, ("key", "value_down"))


def heads_to_residual(layer: dict, out_BTNH: jax.Array) -> jax.Array:
    """Every head's output through its rows of the output matrix (value_up), summed over heads,
    plus the output bias: the change the layer adds to the residual stream. One [B*T, N*H] x
    [N*H, D] matmul."""
    N, H, D = layer["value_up"].shape
    out_BTK = out_BTNH.reshape(*out_BTNH.shape[:-2], N * H)
    return linear(out_BTK, layer["value_up"].reshape(N * H, D), layer.get("output_bias"))


def write_cache(cache: dict, k_BTNH, v_BTNH, positions_BT) -> dict:
    """Layer cache["layer"]'s new keys and values into each row's slots positions_BT[b], in
    place in the whole cache (a layer's slice taken out and put back would copy it)."""
    B, _ = positions_BT.shape
    rows_B1 = jnp.arange(B)[:, None]
    put = lambda c, new_BTNH: c.at[cache["layer"], rows_B1, :, positions_BT].set(
        new_BTNH.astype(c.dtype), indices_are_sorted=True, unique_indices=True)
    return dict(cache, **{name: constrain(put(cache[name], new), CACHE_AXES)
                          for name, new in (("key", k_BTNH), ("value", v_BTNH))})


def read_cache(cache: dict):
    """Layer cache["layer"]'s keys and values, as every kernel takes them: [B, S, N, H] (a view
    of the stored [B, N, S, H], which the dots read as they are)."""
    return tuple(cache[name][cache["layer"]].swapaxes(1, 2) for name in ("key", "value"))


def attention_layer(layer: dict, x_BTD: jax.Array, cfg: ModelConfig, *,
                    positions_BT: jax.Array | None = None, cache: dict | None = None,
                    source_BSD: jax.Array | None = None, mask_BTS: jax.Array | None = None,
                    causal: bool = True, inspect: bool = False):
    """One attention layer in the stored layout, on every path: (delta_BTD, cache, seen).

    Self-attention reads x; with a `cache` ({"key", "value"}: every layer's [L, B, N, S, H],
    "layer": this one's index) it writes the new keys and values at `positions_BT` and reads
    all S slots of its layer,
    the causal rule hiding those past each query. Cross-attention reads `source_BSD`.
    With `inspect`, `seen` holds the patterns [B, N, T, S] and every head's weighted values
    [B, T, N, H] (what value_up turns into its proposed change); else it is None."""
    if (positions_BT is None) != (cache is None):
        raise ValueError("attention_layer: give positions_BT and cache together (decoding), or "
                         "neither (a whole sequence from position 0)")
    theta = cfg.rope_theta if cfg.position == "rope" else None
    q, k, v = project_qkv(layer, x_BTD, source_BSD)
    if theta is not None:
        T, S = q.shape[1], k.shape[1]
        q_positions = jnp.arange(T)[:, None] if positions_BT is None else positions_BT[..., None]
        k_positions = q_positions if source_BSD is None else jnp.arange(S)[:, None]
        q, k = rope(q, q_positions, theta), rope(k, k_positions, theta)
    if cache is not None:
        cache = write_cache(cache, k, v, positions_BT)
        k, v = read_cache(cache)
    out_BTNH, patterns = attend(q, k, v, Visible(positions_BT, causal, mask_BTS), cfg, inspect)
    seen = {"patterns": patterns, "head_outputs": out_BTNH} if inspect else None
    return heads_to_residual(layer, out_BTNH), cache, seen
