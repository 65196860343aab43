"""ModelConfig: the frozen, hashable description of a transformer, and its named presets."""
import dataclasses

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu", "swiglu")
ATTENTION_PATHS = ("reference", "fused", "chunked", "dot_product")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots")  # what each block keeps for the backward pass; see REMAT_POLICIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer, or with `n_encoder_layers` > 0 an encoder-decoder (the
    decoder's blocks then cross-attend to the encoded source). Frozen and hashable, so it can
    be a static jit argument.

    `n_heads * d_head` need not equal `d_model`: each head's value_up maps H back to D.
    """

    vocab_size: int = 256
    context_length: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    n_layers: int = 4
    d_mlp: int = 512
    norm: str = "layernorm"
    position: str = "learned"
    tie_embeddings: bool = True
    bias: bool = True  # every bias: projections, MLP and LayerNorm
    activation: str = "gelu_tanh"
    attention: str = "dot_product"  # on CPU as fast as any; cuDNN flash attention on GPU
    dtype: str = "float32"  # what the matmuls compute in
    param_dtype: str = "float32"  # what the parameters are stored in
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention_chunk: int = 128  # key block size of the 'chunked' path
    # Positions per step of the loss's unembedding and softmax; 0: all at once. n keeps [B, n, V]
    # f32 logits at a time instead of [B, T, V] (GPT-2 small, batch 32: 6.6 GB), for one more
    # unembedding matmul in the backward pass.
    loss_chunk: int = 0
    # Blocks per scan iteration: 1 keeps the compiled program the same size at any depth;
    # n_layers unrolls the loop, which lets XLA fuse across blocks (faster on small models).
    scan_unroll: int = 1
    # What the backward pass keeps of each block: "none" everything it needs; "full" only the
    # block's input (the rest recomputed); "dots" the outputs of matmuls without batch
    # dimensions (the projections and the MLP), recomputing attention's einsums and pointwise ops.
    # Needs a rolled scan (scan_unroll < n_layers): unrolled whole, XLA keeps as much as 'none'.
    remat: str = "none"
    # Encoder blocks (bidirectional self-attention) over a source sequence; 0: decoder only.
    n_encoder_layers: int = 0
    source_length: int = 0  # the longest source the encoder reads; 0: context_length

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "d_head",
                     "n_layers", "d_mlp", "attention_chunk", "scan_unroll"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in (("norm", NORMS), ("position", POSITIONS), ("activation", ACTIVATIONS),
                              ("attention", ATTENTION_PATHS), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat", REMATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("tie_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        for name in ("n_encoder_layers", "source_length", "loss_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 0, got {value!r}")
        if self.remat != "none" and 1 < self.n_layers <= self.scan_unroll:
            raise ValueError(
                f"ModelConfig.remat={self.remat!r} saves no memory when scan_unroll="
                f"{self.scan_unroll} unrolls all {self.n_layers} blocks (XLA's compiled program "
                f"then keeps what remat='none' keeps); set scan_unroll below n_layers (e.g. "
                f"{self.n_layers // 2}) to rematerialize, or remat='none' for the unrolled speed")
        if self.loss_chunk >= self.context_length:
            raise ValueError(
                f"ModelConfig.loss_chunk={self.loss_chunk} is not below context_length="
                f"{self.context_length}: one chunk would hold every position's logits; set it "
                f"below (e.g. {max(1, self.context_length // 4)}), or 0 for the whole sequence")
        if self.position == "rope" and self.d_head % 2:
            raise ValueError(f"ModelConfig.d_head must be even for position='rope', got {self.d_head}")

    @property
    def source_context(self) -> int:
        """The most source tokens the encoder reads."""
        return self.source_length or self.context_length

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration (see `PRESETS`), with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _gpt(n_layers, d_model, n_heads, d_head, context_length):
    """GPT-2 and GPT-3 share one architecture: learned positions, LayerNorm, tanh-GELU, biases,
    tied embeddings, the byte-pair vocabulary of 50,257 tokens, and d_mlp = 4 * d_model."""
    return ModelConfig(vocab_size=50257, context_length=context_length, d_model=d_model,
                       n_heads=n_heads, d_head=d_head, n_layers=n_layers, d_mlp=4 * d_model,
                       norm="layernorm", position="learned", tie_embeddings=True, bias=True,
                       activation="gelu_tanh")


PRESETS = {
    # For tests: every dimension small and distinct, so a mixed-up axis fails loudly.
    "tiny": ModelConfig(vocab_size=61, context_length=16, d_model=24, n_heads=3, d_head=8,
                        n_layers=2, d_mlp=40, attention="reference"),
    # Byte-level, sized so a 2-core laptop CPU trains it in minutes.
    "byte-cpu": ModelConfig(vocab_size=256, context_length=128, d_model=128, n_heads=4, d_head=32,
                            n_layers=4, d_mlp=512, position="rope", scan_unroll=4),
    "gpt2-small": _gpt(12, 768, 12, 64, 1024),
    "gpt2-medium": _gpt(24, 1024, 16, 64, 1024),
    "gpt2-large": _gpt(36, 1280, 20, 64, 1024),
    "gpt2-xl": _gpt(48, 1600, 25, 64, 1024),
    # GPT-3, Table 2.1 of Brown et al. (2020): layers, d_model, heads, d_head; context 2048.
    "gpt3-small": _gpt(12, 768, 12, 64, 2048),
    "gpt3-medium": _gpt(24, 1024, 16, 64, 2048),
    "gpt3-large": _gpt(24, 1536, 16, 96, 2048),
    # The table lists 24 heads of 128 for XL, but 24 * 128 = 3072 != 2048, and with 24 heads the
    # model has 1.52B parameters, not the 1.3B the same row gives. 16 heads of 128 tile the
    # 2048-wide model exactly and give 1.32B, so we take 16.
    "gpt3-xl": _gpt(24, 2048, 16, 128, 2048),
    "gpt3-2.7b": _gpt(32, 2560, 32, 80, 2048),
    "gpt3-6.7b": _gpt(32, 4096, 32, 128, 2048),
    # The table's 5140 is not 40 * 128 = 5120 either; we keep the published width (heads map
    # 5120 -> 5140 through value_up), which gives 12.9B against the table's 13.0B.
    "gpt3-13b": _gpt(40, 5140, 40, 128, 2048),
    "gpt3-175b": _gpt(96, 12288, 96, 128, 2048),
}

# The paper's parameter counts, for the tests and `headwise params`.
GPT3_PUBLISHED_PARAMS = {
    "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13.0e9, "gpt3-175b": 175.0e9,
}
