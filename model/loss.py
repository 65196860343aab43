"""The loss: next-token cross-entropy, from logits or (fused, in 16-bit compute) from the last
block's output."""
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


def target_nll(params: dict, x_BTD: jax.Array, targets_BT: jax.Array, cfg: ModelConfig):
    """-log p(target) at each position, [B, T], from the last block's output: `unembed` then
    the cross-entropy, fused for 16-bit compute (see `_target_nll_16bit`)."""
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
