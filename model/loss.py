"""The loss: next-token cross-entropy, from logits or (fused, in 16-bit compute) from the last
block's output."""
import functools

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .logical import constrain
from .transformer import _check_decoder_only, check_tokens, embed, norm, run_blocks, unembed


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT=None) -> jax.Array:
    """Mean negative log-likelihood of the targets (over positions where mask is true)."""
    return masked_mean(_logits_nll(logits_BTV, targets_BT), mask_BT)


def _logits_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]


def masked_mean(nll_BT: jax.Array, mask_BT=None) -> jax.Array:
    """The mean over positions where mask is true (all, if None)."""
    if mask_BT is None:
        return nll_BT.mean()
    mask_BT = mask_BT.astype(jnp.float32)
    return (nll_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


# 16-bit matmul kernels tile the vocabulary in blocks of 128 columns: GPT-2's 50,257 left
# XLA:GPU an unaligned GEMM (nanoGPT pads its vocabulary to 50,304 for the same reason).
VOCAB_ALIGN = 128


@jax.custom_vjp
def _target_nll_16bit(x_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Each position's -log p(target) from 16-bit x and w, the logits accumulated in f32 over
    a vocabulary padded to VOCAB_ALIGN (the padding's logits masked out). Its gradient goes
    from the saved logits straight to the logits' 16-bit gradient, softmax minus one-hot, in
    one pass: no f32 gradient of [B, T, V] is written and then rounded."""
    return _target_nll_16bit_fwd(x_BTD, w_DV, targets_BT)[0]


def _padded(w_DV: jax.Array) -> jax.Array:
    return jnp.pad(w_DV, ((0, 0), (0, -w_DV.shape[1] % VOCAB_ALIGN)))


def _target_nll_16bit_fwd(x_BTD, w_DV, targets_BT):
    raw_BTW = constrain(jnp.matmul(x_BTD, _padded(w_DV), preferred_element_type=jnp.float32),
                        ("batch", "seq", "vocab"))
    real_W = jnp.arange(raw_BTW.shape[-1]) < w_DV.shape[1]  # False on the padding
    top_BT = jnp.max(jnp.where(real_W, raw_BTW, -jnp.inf), axis=-1)
    lse_BT = top_BT + jnp.log(jnp.sum(jnp.where(real_W, jnp.exp(raw_BTW - top_BT[..., None]), 0),
                                      axis=-1))
    target_BT = jnp.take_along_axis(raw_BTW, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT - target_BT, (x_BTD, w_DV, targets_BT, raw_BTW, lse_BT)


def _target_nll_16bit_bwd(saved, g_BT):
    x_BTD, w_DV, targets_BT, raw_BTW, lse_BT = saved
    column_W = jnp.arange(raw_BTW.shape[-1])
    p_BTW = jnp.where(column_W < w_DV.shape[1], jnp.exp(raw_BTW - lse_BT[..., None]), 0)
    g_BTW = ((p_BTW - (column_W == targets_BT[..., None])) * g_BT[..., None]).astype(x_BTD.dtype)
    return (jnp.einsum("BTW,DW->BTD", g_BTW, _padded(w_DV)),
            jnp.einsum("BTD,BTW->DW", x_BTD, g_BTW)[:, :w_DV.shape[1]], None)


_target_nll_16bit.defvjp(_target_nll_16bit_fwd, _target_nll_16bit_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_target_nll(x_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, chunk: int):
    """`_target_nll_16bit`'s numbers in any dtype, `chunk` positions at a time: the forward keeps
    only each position's log-sum-exp, and the backward computes each chunk's logits again, so
    the loss holds [B, chunk, V] f32 logits at once, not [B, T, V] (for one more matmul of the
    unembedding's size). The weight's gradient is summed over chunks in f32."""
    return _chunked_fwd(x_BTD, w_DV, targets_BT, chunk)[0]


def _pad_positions(a, chunk):
    """[B, T, ...] padded with zeros to a whole number of chunks of positions (itself if it is
    one: not a copy for the backward to keep)."""
    pad = -a.shape[1] % chunk
    return jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) if pad else a


def _chunk_loop(positions, chunk, body, init):
    """`body(take, put, carry)` for each chunk of `chunk` positions (of `positions`, a whole
    number of chunks): `take(a)` is padded [B, T, ...] array a's chunk, `put(a, c)` writes c
    there."""
    def step(i, carry):
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)
        put = lambda a, c: jax.lax.dynamic_update_slice_in_dim(a, c, i * chunk, axis=1)
        return body(take, put, carry)

    return jax.lax.fori_loop(0, positions // chunk, step, init)


def _chunk_logits(x_BCD, w_DW, n_real):
    raw_BCW = constrain(jnp.matmul(x_BCD, w_DW, preferred_element_type=jnp.float32),
                        ("batch", "seq", "vocab"))
    return jnp.where(jnp.arange(raw_BCW.shape[-1]) < n_real, raw_BCW, -jnp.inf)


def _chunked_fwd(x_BTD, w_DV, targets_BT, chunk):
    w_DW, T = _padded(w_DV), x_BTD.shape[1]
    x_BTD, targets_BT = _pad_positions(x_BTD, chunk), _pad_positions(targets_BT, chunk)

    def body(take, put, nll_lse):
        logits_BCW = _chunk_logits(take(x_BTD), w_DW, w_DV.shape[1])
        lse_BC = jax.nn.logsumexp(logits_BCW, axis=-1)
        target_BC = jnp.take_along_axis(logits_BCW, take(targets_BT)[..., None], axis=-1)[..., 0]
        return put(nll_lse[0], lse_BC - target_BC), put(nll_lse[1], lse_BC)

    zeros = jnp.zeros(targets_BT.shape, jnp.float32)
    nll_BT, lse_BT = _chunk_loop(x_BTD.shape[1], chunk, body, (zeros, zeros))
    return nll_BT[:, :T], (x_BTD, w_DV, targets_BT, lse_BT)


def _chunked_bwd(chunk, saved, g_BT):
    x_BTD, w_DV, targets_BT, lse_BT = saved  # padded to whole chunks
    w_DW, T = _padded(w_DV), g_BT.shape[1]
    g_BT = _pad_positions(g_BT, chunk)  # the padding's positions: no gradient

    def body(take, put, grads):
        dx_BTD, dw_DW = grads
        x_BCD = take(x_BTD)
        p_BCW = jnp.exp(_chunk_logits(x_BCD, w_DW, w_DV.shape[1]) - take(lse_BT)[..., None])
        onehot_BCW = jnp.arange(w_DW.shape[1]) == take(targets_BT)[..., None]
        g_BCW = ((p_BCW - onehot_BCW) * take(g_BT)[..., None]).astype(x_BCD.dtype)
        return (put(dx_BTD, jnp.einsum("BCW,DW->BCD", g_BCW, w_DW)),
                dw_DW + jnp.einsum("BCD,BCW->DW", x_BCD, g_BCW,
                                   preferred_element_type=jnp.float32))

    init = (jnp.zeros_like(x_BTD), jnp.zeros(w_DW.shape, jnp.float32))
    dx_BTD, dw_DW = _chunk_loop(x_BTD.shape[1], chunk, body, init)
    return dx_BTD[:, :T], dw_DW[:, :w_DV.shape[1]].astype(w_DV.dtype), None


_chunked_target_nll.defvjp(_chunked_fwd, _chunked_bwd)


def target_nll(params: dict, x_BTD: jax.Array, targets_BT: jax.Array, cfg: ModelConfig):
    """-log p(target) at each position, [B, T], from the last block's output: `unembed` then
    the cross-entropy, fused for 16-bit compute (see `_target_nll_16bit`), and `cfg.loss_chunk`
    positions at a time if that is set and shorter than the sequence (`_chunked_target_nll`)."""
    if 0 < cfg.loss_chunk < x_BTD.shape[1]:
        w_DV = params["embed"]["token"].T if cfg.tie_embeddings else params["unembed"]
        x_BTD = norm(params["final_norm"], x_BTD, cfg)
        return _chunked_target_nll(x_BTD, w_DV.astype(x_BTD.dtype), targets_BT, cfg.loss_chunk)
    if x_BTD.dtype == jnp.float32:
        return _logits_nll(constrain(unembed(params, x_BTD, cfg), ("batch", "seq", "vocab")),
                           targets_BT)
    w_DV = params["embed"]["token"].T if cfg.tie_embeddings else params["unembed"]
    x_BTD = norm(params["final_norm"], x_BTD, cfg)
    return _target_nll_16bit(x_BTD, w_DV.astype(x_BTD.dtype), targets_BT)


def loss(params: dict, tokens: jax.Array, targets: jax.Array, cfg: ModelConfig,
         mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in nats."""
    check_tokens(targets, cfg, "targets")
    _check_decoder_only(cfg)
    check_tokens(tokens, cfg)
    x_BTD, _, _ = run_blocks(params, embed(params, tokens, cfg), cfg)
    return masked_mean(target_nll(params, x_BTD, targets, cfg), mask)
