"""Attention a block of keys at a time: an online softmax forward and a flash-attention
backward, so memory grows linearly with the context."""
import functools

import jax
import jax.numpy as jnp

from .masks import MASKED, Visible, causal


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


def _block_mask(start, S: int, chunk: int, causal_: bool, positions_BT, mask_BTC):
    """Which of one block's keys each query may read, built per block so that no [T, S] mask
    exists: keys past S are padding."""
    s_C = start + jnp.arange(chunk)
    allowed = (s_C < S)[None, None, :]
    if causal_:
        allowed = allowed & causal(positions_BT, s_C)
    return allowed if mask_BTC is None else allowed & mask_BTC


def _tied(start, k_BCNH):
    """`start`, made to depend on the block's keys. Under jax.grad of the model's layer scan,
    JAX's partial evaluation splits off whatever depends on no parameter: the causal masks of
    all key blocks would be computed in a loop of their own and kept at once ([n, B, N, T, C]:
    quadratic in T). Tied to the keys, each block's mask is made inside the loop, when needed."""
    return jax.lax.optimization_barrier((start, k_BCNH))[0]


def _block_scores(q_BTNH, k_BCNH):
    return jnp.einsum("BTNH,BCNH->BNTC", q_BTNH, k_BCNH.astype(jnp.float32))


def _block_probs(scores_BNTC, mask_BTC, shift_BNT):
    """exp(score - shift) where allowed, exactly 0 where masked."""
    return jnp.where(mask_BTC[:, None], jnp.exp(scores_BNTC - shift_BNT[..., None]), 0.0)


def _chunked_forward(q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, chunk, causal_):
    """(out_BNTH, logsumexp_BNT) with an online softmax (running max and sum) over key blocks.
    `q_BTNH` is already scaled by 1/sqrt(H) and in f32."""
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]

    def step(carry, block):
        max_BNT, sum_BNT, acc_BNTH = carry
        k_BCNH, v_BCNH, start, mask_BTC = block
        mask_BTC = _block_mask(_tied(start, k_BCNH), S, chunk, causal_, positions_BT, mask_BTC)
        scores = _block_scores(q_BTNH, k_BCNH)
        new_max = jnp.maximum(max_BNT, jnp.where(mask_BTC[:, None], scores, MASKED).max(-1))
        p_BNTC = _block_probs(scores, mask_BTC, new_max)
        rescale = jnp.exp(max_BNT - new_max)
        acc_BNTH = acc_BNTH * rescale[..., None] + jnp.einsum(
            "BNTC,BCNH->BNTH", p_BNTC, v_BCNH.astype(jnp.float32))
        return (new_max, sum_BNT * rescale + p_BNTC.sum(-1), acc_BNTH), None

    init = (jnp.full((B, N, T), MASKED), jnp.zeros((B, N, T)), jnp.zeros((B, N, T, H)))
    (max_BNT, sum_BNT, acc_BNTH), _ = jax.lax.scan(
        step, init, _key_blocks(k_BSNH, v_BSNH, mask_BTS, chunk))
    # A query with no allowed key gets a zero output rather than 0/0.
    empty = sum_BNT == 0
    out_BNTH = acc_BNTH / jnp.where(empty, 1.0, sum_BNT)[..., None]
    return out_BNTH, jnp.where(empty, 0.0, max_BNT + jnp.log(jnp.where(empty, 1.0, sum_BNT)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked(q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, chunk, causal_):
    return _chunked_forward(q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, chunk, causal_)[0]


def _chunked_fwd(q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, chunk, causal_):
    out_BNTH, lse_BNT = _chunked_forward(q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, chunk,
                                         causal_)
    return out_BNTH, (q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, out_BNTH, lse_BNT)


def _chunked_bwd(chunk, causal_, saved, dout_BNTH):
    """The flash-attention backward: only the output and one logsumexp per query were saved;
    each key block's pattern is recomputed, so the backward pass is linear in T as well."""
    q_BTNH, k_BSNH, v_BSNH, positions_BT, mask_BTS, out_BNTH, lse_BNT = saved
    S = k_BSNH.shape[1]
    delta_BNT = (dout_BNTH * out_BNTH).sum(-1)

    def step(dq_BTNH, block):
        k_BCNH, v_BCNH, start, mask_BTC = block
        mask_BTC = _block_mask(start, S, chunk, causal_, positions_BT, mask_BTC)
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
            unblock(dv_nBCNH).astype(v_BSNH.dtype), None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def attend_chunked(q_BTNH, k_BSNH, v_BSNH, visible: Visible, chunk: int = 128):
    """Keys in blocks of `chunk` with an online softmax, and a backward pass that recomputes
    each block's pattern from a saved logsumexp (as flash attention does). The causal mask is
    made block by block too: without a caller's mask no [T, S] array exists, forward or
    backward, so memory grows linearly with T."""
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    q_BTNH = q_BTNH.astype(jnp.float32) / jnp.sqrt(jnp.float32(H))
    mask_BTS = visible.mask_BTS
    if mask_BTS is not None:
        mask_BTS = jnp.broadcast_to(mask_BTS, (B, T, S))
    out_BNTH = _chunked(q_BTNH, k_BSNH, v_BSNH, visible.query_positions(T, S), mask_BTS,
                        min(chunk, S), visible.causal)
    return out_BNTH.transpose(0, 2, 1, 3).astype(v_BSNH.dtype), None
