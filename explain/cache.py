"""One forward pass that keeps everything the explanation talks about, from the model's own blocks."""
import jax
import jax.numpy as jnp

from headwise.model import ModelConfig, embed, run_blocks, unembed
from headwise.model.encoder_decoder import check_source, encode, encoded_source
from headwise.model.logical import constrain
from headwise.model.transformer import check_tokens


def run_with_cache(params: dict, cfg: ModelConfig, tokens_BT: jax.Array, source_BS=None,
                   source_mask_BS=None):
    """(logits_BTV, cache): the logits of `forward(..., return_patterns=True)` and a dict of
    - "residual" [B, L+1, T, D]: the residual stream entering each block, then leaving the last;
    - "patterns" [B, L, N, T, T]: every head's attention pattern (rows sum to 1);
    - "head_deltas" [B, L, N, T, D]: each head's proposed change, before the output bias;
    - "attention_deltas" [B, L, T, D]: each attention layer's change, bias included;
    - "mlp_deltas" [B, L, T, D].
    residual[:, l+1] = residual[:, l] + attention_deltas[:, l] + mlp_deltas[:, l], and the
    heads' deltas summed plus the output bias make attention_deltas. Any attention path, under
    jit, on a mesh (arrays named like the activations).
    An encoder-decoder reads `source_BS` (`source_mask_BS`: False at padding) and adds
    "cross_patterns" [B, L, N, T, S], "cross_head_deltas" [B, L, N, T, D],
    "cross_attention_deltas" [B, L, T, D] (in the residual's sum too) and the encoder's
    "encoder_patterns" [B, Le, N, S, S]."""
    check_tokens(tokens_BT, cfg)
    source, encoder_seen = None, None
    if cfg.n_encoder_layers or source_BS is not None:
        check_source(source_BS, cfg, source_mask_BS)
        memory_BSD, encoder_seen = encode(params, source_BS, cfg, source_mask_BS, inspect=True)
        source = encoded_source(params, memory_BSD, source_mask_BS, cfg)
    x_BTD, _, seen = run_blocks(params, embed(params, tokens_BT, cfg), cfg, inspect=True,
                                source=source)
    logits_BTV = constrain(unembed(params, x_BTD, cfg), ("batch", "seq", "vocab"))
    batch_first = lambda a: jnp.moveaxis(a, 0, 1)  # scan stacks layers first
    cache = {name: batch_first(array) for name, array in seen.items() if name != "residual"}
    cache["residual"] = batch_first(jnp.concatenate([seen["residual"], x_BTD[None]], axis=0))
    if encoder_seen is not None:
        cache["encoder_patterns"] = batch_first(encoder_seen["patterns"])
    return logits_BTV, cache
