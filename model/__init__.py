"""Model functions: attention heads, blocks, forward pass, counts. No meshes, files or optimizers."""
from .attention import (attention_head, attention_layer, attention_pattern, attention_scores,
                        heads_view, multi_head_attention, output_matrix, weigh_values)
from .config import PRESETS, ModelConfig
from .count import count_params, flops_per_token
from .encoder_decoder import (encode, encoder_decoder_loss, forward_encoder_decoder,
                              greedy_decode)
from .loss import cross_entropy, loss
from .masks import causal, causal_mask
from .params import ParamSpec, init_params, param_axes, param_shapes, param_specs
from .transformer import block, embed, forward, forward_embeddings, run_blocks, unembed

__all__ = [
    "ModelConfig", "PRESETS", "ParamSpec", "param_specs", "param_axes", "param_shapes",
    "init_params", "forward", "forward_embeddings", "embed", "unembed", "loss", "cross_entropy",
    "block", "run_blocks", "attention_head", "multi_head_attention", "attention_scores",
    "attention_pattern", "weigh_values", "causal", "causal_mask", "output_matrix", "heads_view", "attention_layer",
    "count_params", "flops_per_token",
    "encode", "forward_encoder_decoder", "encoder_decoder_loss", "greedy_decode",
]
