"""Reading a cache: the logit lens, each component's push on a logit, and heads ranked by a pattern."""
import jax
import jax.numpy as jnp

from headwise.model import ModelConfig, unembed


def logit_lens(params: dict, cfg: ModelConfig, residual_BLTD: jax.Array) -> jax.Array:
    """Each layer's residual stream read as if it were the last: through the final norm and
    the unembedding. [B, L+1, T, D] -> logits [B, L+1, T, V]; the last layer's are the model's."""
    return unembed(params, residual_BLTD, cfg)


def top_tokens(logits_V: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(ids, probabilities) of the k likeliest tokens under softmax(logits), likeliest first."""
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits_V.astype(jnp.float32), axis=-1), k)
    return ids, probs


def _unembedding_column(params: dict, cfg: ModelConfig, token: int) -> jax.Array:
    w_DV = params["embed"]["token"].T if cfg.tie_embeddings else params["unembed"]
    return w_DV[:, token].astype(jnp.float32)


def _through_final_norm(params, cfg, parts_XD, final_BD):
    """The final norm is linear once its scale is frozen at the final residual's: each part
    of the residual, centred (LayerNorm), times that scale and the norm's gain."""
    final = final_BD.astype(jnp.float32)
    if cfg.norm == "layernorm":
        final = final - final.mean(-1, keepdims=True)
        parts_XD = parts_XD - parts_XD.mean(-1, keepdims=True)
    inv_rms_B = jax.lax.rsqrt((final * final).mean(-1) + cfg.norm_eps)
    gain_D = params["final_norm"]["scale"].astype(jnp.float32)
    return parts_XD * gain_D, inv_rms_B


def logit_contributions(params: dict, cfg: ModelConfig, cache: dict, token: int,
                        position: int = -1) -> dict:
    """How much each part of the residual stream at `position` pushes the logit of `token`
    (direct logit attribution): "embedding" [B], "heads" [B, L, N], "attention_bias" [B, L],
    "mlps" [B, L], "final_bias" [B]. They add up to the logit: the final norm's scale is the
    one the whole residual stream gets, so each part is scaled exactly as it is in the sum."""
    column_D = _unembedding_column(params, cfg, token)
    final_BD = cache["residual"][:, -1, position]

    def push(parts_XD):  # parts with the batch first, any axes between, D last
        scaled, inv_rms_B = _through_final_norm(params, cfg, parts_XD.astype(jnp.float32), final_BD)
        inv_rms = inv_rms_B.reshape(inv_rms_B.shape + (1,) * (scaled.ndim - 2))
        return (scaled @ column_D) * inv_rms

    heads_BLND = cache["head_deltas"][:, :, :, position]
    bias_BLD = cache["attention_deltas"][:, :, position] - heads_BLND.sum(2)
    final_bias = params["final_norm"].get("bias", jnp.zeros(cfg.d_model))
    return {"embedding": push(cache["residual"][:, 0, position]), "heads": push(heads_BLND),
            "attention_bias": push(bias_BLD), "mlps": push(cache["mlp_deltas"][:, :, position]),
            "final_bias": jnp.broadcast_to(final_bias.astype(jnp.float32) @ column_D,
                                           final_BD.shape[:1])}


def head_scores(patterns_BLNTS: jax.Array, query_positions, key_positions) -> jax.Array:
    """[L, N]: the attention each head pays from the queries at `query_positions` to the keys
    at `key_positions`, averaged over those queries and the batch (1: all of it)."""
    from_queries = patterns_BLNTS[:, :, :, jnp.asarray(query_positions)]
    return from_queries[..., jnp.asarray(key_positions)].sum(-1).mean(axis=(0, 3))


def rank_heads(scores_LN: jax.Array) -> list[tuple[int, int, float]]:
    """(layer, head, score) for every head, highest score first."""
    L, N = scores_LN.shape
    flat = [(l, n, float(scores_LN[l, n])) for l in range(L) for n in range(N)]
    return sorted(flat, key=lambda row: -row[2])
