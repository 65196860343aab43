"""Where the parameters are and what a token costs, from the config alone (closed forms)."""
from .config import ModelConfig


def count_params(cfg: ModelConfig) -> dict:
    """Parameter counts by component. `per_block` holds one (decoder) block's; `blocks` all L
    of them. An encoder-decoder adds `encoder` (its blocks, final norm and positions) and, in
    each decoder block, a cross-attention layer (the same matrices as self-attention) and its
    norm; `attention_weights` then counts every attention layer's matrices."""
    V, C, D, N, H, L, F = (cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.n_heads,
                           cfg.d_head, cfg.n_layers, cfg.d_mlp)
    norm = D * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    mlp_matrices = 3 if cfg.activation == "swiglu" else 2
    attention_biases = (3 * N * H + D) if cfg.bias else 0
    block = {
        "query": N * D * H,
        "key": N * D * H,
        "value_down": N * D * H,
        "value_up": N * H * D,
        "attention_biases": attention_biases,
        "mlp": mlp_matrices * D * F,
        "mlp_biases": ((mlp_matrices - 1) * F + D) if cfg.bias else 0,
        "norms": 2 * norm,
    }
    block["attention"] = block["query"] + block["key"] + block["value_down"] + block["value_up"]
    block["total"] = sum(v for k, v in block.items() if k not in ("attention", "total"))
    encoder_block_total = block["total"]
    if cfg.n_encoder_layers:
        block["cross_attention"] = block["attention"] + attention_biases
        block["cross_attention_norm"] = norm
        block["total"] += block["cross_attention"] + norm
    counts = {
        "embedding": V * D,
        "positions": C * D if cfg.position == "learned" else 0,
        "per_block": block,
        "blocks": L * block["total"],
        "attention_weights": L * block["attention"],
        "final_norm": norm,
        "unembedding": 0 if cfg.tie_embeddings else D * V,
    }
    if cfg.n_encoder_layers:
        Le = cfg.n_encoder_layers
        counts["encoder_positions"] = cfg.source_context * D if cfg.position == "learned" else 0
        counts["encoder"] = Le * encoder_block_total + norm + counts["encoder_positions"]
        counts["attention_weights"] = (2 * L + Le) * block["attention"]
    counts["total"] = (counts["embedding"] + counts["positions"] + counts["blocks"]
                       + counts["final_norm"] + counts["unembedding"] + counts.get("encoder", 0))
    return counts


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per weight a token is
    multiplied by, plus attention's q·k and pattern·v, 12·L·N·H·T (as in PaLM's appendix B;
    the causal mask's skipped half is counted, as everyone does). Lookup tables (positions,
    and the token embedding unless tied, when it doubles as the unembedding) do no matmul."""
    counts = count_params(cfg)
    matmul_params = counts["total"] - counts["positions"] - counts.get("encoder_positions", 0)
    if not cfg.tie_embeddings:
        matmul_params -= counts["embedding"]
    T = cfg.context_length if seq_len is None else seq_len
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.d_head * T


def _about(n: float) -> str:
    """A human size: 58 B, 1.32 B, 125 M."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"about {n / size:.3g} {unit}"
    return str(int(n))


def params_table(cfg: ModelConfig, name: str = "model") -> str:
    """The breakdown as a table, then the explanation's headline figures."""
    c, b = count_params(cfg), count_params(cfg)["per_block"]
    D, N, H, L, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers, cfg.vocab_size
    rows = [
        (f"embedding ({V:,} × {D:,})", c["embedding"]),
        (f"positions ({cfg.context_length:,} × {D:,})", c["positions"]),
        ("per block:", None),
        (f"  query ({N} heads × {D:,} × {H})", b["query"]),
        (f"  key ({N} heads × {D:,} × {H})", b["key"]),
        (f"  value_down ({N} heads × {D:,} × {H})", b["value_down"]),
        (f"  value_up ({N} heads × {H} × {D:,})", b["value_up"]),
        ("  attention biases", b["attention_biases"]),
        (f"  mlp ({D:,} ↔ {cfg.d_mlp:,})", b["mlp"]),
        ("  mlp biases", b["mlp_biases"]),
        ("  norms", b["norms"]),
        ("  block total", b["total"]),
        (f"blocks ({L} × {b['total']:,})", c["blocks"]),
        ("final norm", c["final_norm"]),
        ("unembedding" + (" (tied to the embedding)" if cfg.tie_embeddings else ""),
         c["unembedding"]),
        ("total", c["total"]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{name}: {L} layers, d_model {D:,}, {N} heads of {H}, d_mlp {cfg.d_mlp:,}, "
             f"vocab {V:,}, context {cfg.context_length:,}", ""]
    lines += [f"{label:<{width}}{'' if n is None else f'{n:>18,}'}" for label, n in rows]
    per_head = b["attention"] // N
    lines += ["", "The explanation's figures:",
              f"  weights per head: 4 × {D:,} × {H} = {per_head:,}",
              f"  attention weights per block: {N} × {per_head:,} = {b['attention']:,}",
              f"  attention weights over {L} blocks: {c['attention_weights']:,} "
              f"({_about(c['attention_weights'])})",
              f"  embedding: {V:,} × {D:,} = {c['embedding']:,}",
              f"  total: {c['total']:,} ({_about(c['total'])})"]
    return "\n".join(lines)
