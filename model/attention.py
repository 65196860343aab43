"""Attention as the explanation tells it (one head, then many), plus the fast batched paths."""
import functools

import jax
import jax.numpy as jnp

from .config import ModelConfig

# Masked scores get the most negative finite value rather than -inf: exp() still makes them
# exactly 0 next to any allowed key, and a row with no allowed key gives no NaN.
_MASKED = jnp.finfo(jnp.float32).min


# --- The explanation's view: one head on one sequence ------------------------------------------

def attention_scores(q_TH: jax.Array, k_SH: jax.Array) -> jax.Array:
    """Every query against every key: q·k / sqrt(H), so scores do not grow with head width."""
    return (q_TH @ k_SH.T) / jnp.sqrt(jnp.float32(q_TH.shape[-1])).astype(q_TH.dtype)


def causal_mask(T: int, S: int | None = None) -> jax.Array:
    """[T, S] booleans, True where query t may look at key s: s <= t. With S > T the queries are
    the last T positions of the S keys (as when decoding after a prefix)."""
    S = T if S is None else S
    return jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)


def attention_pattern(scores_TS: jax.Array, mask_TS: jax.Array | None = None) -> jax.Array:
    """Softmax over keys. Row t holds how much query t attends to each key: each row sums to 1
    and masked entries are exactly 0. (The explanation draws keys as rows, so there its
    columns sum to 1: the same pattern, transposed.)"""
    scores_TS = scores_TS.astype(jnp.float32)
    if mask_TS is not None:
        scores_TS = jnp.where(mask_TS, scores_TS, _MASKED)
    return jax.nn.softmax(scores_TS, axis=-1)


def rope(x_TH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding: rotate pairs (i, i + H/2) of each vector by position * freq_i.
    `positions` broadcasts against `x.shape[:-1]`, so any leading axes work."""
    half = x_TH.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_T[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x_TH[..., :half].astype(jnp.float32), x_TH[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_TH.dtype)


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
    pattern_TS = attention_pattern(attention_scores(q_TH, k_SH), mask_TS)
    v_SH = _project(source_SD, head, "value_down")
    delta_TD = (pattern_TS.astype(v_SH.dtype) @ v_SH) @ head["value_up"]
    return delta_TD, pattern_TS


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


# --- Fast paths: whole batches, stored layout, wide matmuls -------------------------------------

def project_qkv(layer: dict, x_BTD: jax.Array, source_BSD: jax.Array | None = None):
    """q_BTNH, k_BSNH, v_BSNH. Self-attention does ONE [B*T, D] x [D, 3*N*H] matmul."""
    B, T, D = x_BTD.shape
    _, N, H = layer["query"].shape
    names = ("query", "key", "value_down")
    if source_BSD is None:
        w_DK = jnp.concatenate([layer[n].reshape(D, N * H) for n in names], axis=1)
        y = x_BTD.reshape(B * T, D) @ w_DK
        if "query_bias" in layer:
            y = y + jnp.concatenate([layer[f"{n}_bias"].reshape(N * H) for n in names])
        return tuple(y.reshape(B, T, 3, N, H)[:, :, i] for i in range(3))
    q = x_BTD.reshape(B * T, D) @ layer["query"].reshape(D, N * H)
    S = source_BSD.shape[1]
    kv = source_BSD.reshape(B * S, D) @ jnp.concatenate(
        [layer[n].reshape(D, N * H) for n in names[1:]], axis=1)
    if "query_bias" in layer:
        q = q + layer["query_bias"].reshape(N * H)
        kv = kv + jnp.concatenate([layer[f"{n}_bias"].reshape(N * H) for n in names[1:]])
    kv = kv.reshape(B, S, 2, N, H)
    return q.reshape(B, T, N, H), kv[:, :, 0], kv[:, :, 1]


def attend_fused(q_BTNH, k_BSNH, v_BSNH, mask_BTS):
    """Scores, pattern and weighted values as three einsums: (out_BTNH, pattern_BNTS)."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BTNH.shape[-1]))
    scores = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH).astype(jnp.float32) * scale
    pattern_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], scores, _MASKED), axis=-1)
    out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", pattern_BNTS.astype(v_BSNH.dtype), v_BSNH)
    return out_BTNH, pattern_BNTS


def _key_blocks(k_BSNH, v_BSNH, mask_BTS, chunk: int):
    """Keys and values cut into n blocks of `chunk` keys, the last padded: [n, B, C, N, H] each,
    the blocks' first key positions [n], and the caller's mask (if any) likewise [n, B, T, C]."""
    B, S, N, H = k_BSNH.shape
    pad = -S % chunk
    n = (S + pad) // chunk
    k_BSNH, v_BSNH = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k_BSNH, v_BSNH))
    if mask_BTS is not None:
        mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, 0), (0, pad)))
        mask_BTS = mask_BTS.reshape(B, -1, n, chunk).transpose(2, 0, 1, 3)
    return (k_BSNH.reshape(B, n, chunk, N, H).swapaxes(0, 1),
            v_BSNH.reshape(B, n, chunk, N, H).swapaxes(0, 1), jnp.arange(n) * chunk, mask_BTS)


def _block_mask(start, T: int, S: int, chunk: int, causal: bool, mask_BTC):
    """Which of one block's keys each query may read, built per block so that no [T, S] mask
    exists: keys past S are padding; causal queries are the last T of the S positions."""
    s_C = start + jnp.arange(chunk)
    allowed_TC = jnp.broadcast_to(s_C < S, (T, chunk))
    if causal:
        allowed_TC = allowed_TC & (s_C[None, :] <= jnp.arange(T)[:, None] + (S - T))
    return allowed_TC[None] if mask_BTC is None else allowed_TC[None] & mask_BTC


def _block_scores(q_BTNH, k_BCNH):
    return jnp.einsum("BTNH,BCNH->BNTC", q_BTNH, k_BCNH.astype(jnp.float32))


def _block_probs(scores_BNTC, mask_BTC, shift_BNT):
    """exp(score - shift) where allowed, exactly 0 where masked."""
    return jnp.where(mask_BTC[:, None], jnp.exp(scores_BNTC - shift_BNT[..., None]), 0.0)


def _chunked_forward(q_BTNH, k_BSNH, v_BSNH, mask_BTS, chunk, causal):
    """(out_BNTH, logsumexp_BNT) with an online softmax (running max and sum) over key blocks.
    `q_BTNH` is already scaled by 1/sqrt(H) and in f32."""
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]

    def step(carry, block):
        max_BNT, sum_BNT, acc_BNTH = carry
        k_BCNH, v_BCNH, start, mask_BTC = block
        mask_BTC = _block_mask(start, T, S, chunk, causal, mask_BTC)
        scores = _block_scores(q_BTNH, k_BCNH)
        new_max = jnp.maximum(max_BNT, jnp.where(mask_BTC[:, None], scores, _MASKED).max(-1))
        p_BNTC = _block_probs(scores, mask_BTC, new_max)
        rescale = jnp.exp(max_BNT - new_max)
        acc_BNTH = acc_BNTH * rescale[..., None] + jnp.einsum(
            "BNTC,BCNH->BNTH", p_BNTC, v_BCNH.astype(jnp.float32))
        return (new_max, sum_BNT * rescale + p_BNTC.sum(-1), acc_BNTH), None

    init = (jnp.full((B, N, T), _MASKED), jnp.zeros((B, N, T)), jnp.zeros((B, N, T, H)))
    (max_BNT, sum_BNT, acc_BNTH), _ = jax.lax.scan(
        step, init, _key_blocks(k_BSNH, v_BSNH, mask_BTS, chunk))
    # A query with no allowed key gets a zero output rather than 0/0.
    empty = sum_BNT == 0
    out_BNTH = acc_BNTH / jnp.where(empty, 1.0, sum_BNT)[..., None]
    return out_BNTH, jnp.where(empty, 0.0, max_BNT + jnp.log(jnp.where(empty, 1.0, sum_BNT)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(q_BTNH, k_BSNH, v_BSNH, mask_BTS, chunk, causal):
    return _chunked_forward(q_BTNH, k_BSNH, v_BSNH, mask_BTS, chunk, causal)[0]


def _chunked_fwd(q_BTNH, k_BSNH, v_BSNH, mask_BTS, chunk, causal):
    out_BNTH, lse_BNT = _chunked_forward(q_BTNH, k_BSNH, v_BSNH, mask_BTS, chunk, causal)
    return out_BNTH, (q_BTNH, k_BSNH, v_BSNH, mask_BTS, out_BNTH, lse_BNT)


def _chunked_bwd(chunk, causal, saved, dout_BNTH):
    """The flash-attention backward: only the output and one logsumexp per query were saved;
    each key block's pattern is recomputed, so the backward pass is linear in T as well."""
    q_BTNH, k_BSNH, v_BSNH, mask_BTS, out_BNTH, lse_BNT = saved
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    delta_BNT = (dout_BNTH * out_BNTH).sum(-1)

    def step(dq_BTNH, block):
        k_BCNH, v_BCNH, start, mask_BTC = block
        mask_BTC = _block_mask(start, T, S, chunk, causal, mask_BTC)
        p_BNTC = _block_probs(_block_scores(q_BTNH, k_BCNH), mask_BTC, lse_BNT)  # recomputed
        dv_BCNH = jnp.einsum("BNTC,BNTH->BCNH", p_BNTC, dout_BNTH)
        dp_BNTC = jnp.einsum("BNTH,BCNH->BNTC", dout_BNTH, v_BCNH.astype(jnp.float32))
        ds_BNTC = p_BNTC * (dp_BNTC - delta_BNT[..., None])
        dq_BTNH = dq_BTNH + jnp.einsum("BNTC,BCNH->BTNH", ds_BNTC, k_BCNH.astype(jnp.float32))
        dk_BCNH = jnp.einsum("BNTC,BTNH->BCNH", ds_BNTC, q_BTNH)
        return dq_BTNH, (dk_BCNH, dv_BCNH)

    dq_BTNH, (dk_nBCNH, dv_nBCNH) = jax.lax.scan(
        step, jnp.zeros_like(q_BTNH), _key_blocks(k_BSNH, v_BSNH, mask_BTS, chunk))
    unblock = lambda d: d.swapaxes(0, 1).reshape(d.shape[1], -1, *d.shape[3:])[:, :S]
    return (dq_BTNH, unblock(dk_nBCNH).astype(k_BSNH.dtype),
            unblock(dv_nBCNH).astype(v_BSNH.dtype), None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def attend_chunked(q_BTNH, k_BSNH, v_BSNH, mask_BTS, chunk: int, causal: bool = False):
    """Keys in blocks of `chunk` with an online softmax, and a backward pass that recomputes
    each block's pattern from a saved logsumexp (as flash attention does). With `causal` and no
    `mask_BTS`, the mask is made block by block too: no [T, S] array exists, forward or
    backward, so memory grows linearly with T."""
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    q_BTNH = q_BTNH.astype(jnp.float32) / jnp.sqrt(jnp.float32(H))
    if mask_BTS is not None:
        mask_BTS = jnp.broadcast_to(mask_BTS, (B, T, S))
    out_BNTH = _chunked(q_BTNH, k_BSNH, v_BSNH, mask_BTS, min(chunk, S), causal)
    return out_BNTH.transpose(0, 2, 1, 3).astype(v_BSNH.dtype)


def attend_dot_product(q_BTNH, k_BSNH, v_BSNH, mask_BTS, is_causal: bool):
    """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU, XLA elsewhere."""
    if is_causal:  # the library's own causal path, which cuDNN fuses
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True)
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BTS[:, None])


def heads_to_residual(layer: dict, out_BTNH: jax.Array) -> jax.Array:
    """Every head's output through its rows of the output matrix (value_up), summed over heads,
    plus the output bias: the change the layer adds to the residual stream."""
    B, T, N, H = out_BTNH.shape
    delta = out_BTNH.reshape(B * T, N * H) @ layer["value_up"].reshape(N * H, -1)
    delta = delta.reshape(B, T, -1)
    return delta + layer["output_bias"] if "output_bias" in layer else delta


def _mask(T: int, S: int, causal: bool, mask) -> jax.Array:
    """The causal mask combined with a caller's mask (anything broadcasting to [T, S])."""
    allowed = causal_mask(T, S) if causal else jnp.ones((T, S), bool)
    return allowed if mask is None else allowed & mask


def attention_layer(layer: dict, x: jax.Array, cfg: ModelConfig, *, causal: bool = True,
                    source: jax.Array | None = None, mask: jax.Array | None = None,
                    return_patterns: bool = False):
    """One attention layer in the stored layout, by the path `cfg.attention` names:
    (delta, patterns or None). 'reference' takes ONE sequence (x_TD, patterns_NTS); the fast
    paths take batches (x_BTD, patterns_BNTS). Asking for patterns makes 'chunked' and
    'dot_product' compute them explicitly, as 'fused' does."""
    theta = cfg.rope_theta if cfg.position == "rope" else None
    T, S = x.shape[-2], (x if source is None else source).shape[-2]
    if cfg.attention == "reference":
        delta, patterns = multi_head_attention(heads_view(layer), x, _mask(T, S, causal, mask),
                                               source, rope_theta=theta)
        if "output_bias" in layer:
            delta = delta + layer["output_bias"]
        return delta, (patterns if return_patterns else None)
    q, k, v = project_qkv(layer, x, source)
    if theta is not None:
        q = rope(q, jnp.arange(T)[:, None], theta)
        k = rope(k, jnp.arange(S)[:, None], theta)
    patterns = None
    if cfg.attention == "chunked" and not return_patterns:  # builds no [T, S] mask at all
        out_BTNH = attend_chunked(q, k, v, mask, cfg.attention_chunk, causal)
    else:
        mask_BTS = jnp.broadcast_to(_mask(T, S, causal, mask), (x.shape[0], T, S))
        if cfg.attention == "dot_product" and not return_patterns:
            plain_causal = causal and mask is None and T == S
            out_BTNH = attend_dot_product(q, k, v, mask_BTS, plain_causal)
        else:
            out_BTNH, patterns = attend_fused(q, k, v, mask_BTS)
    return heads_to_residual(layer, out_BTNH), patterns
