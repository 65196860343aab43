"""Compiled temporary memory of the model's gradient, per attention path and context length
(XLA's own figure from memory_analysis(); compiled only, nothing runs, so T = 16k is cheap).

    python benchmarks/attention_memory.py [--layers 1] [--batch 1] [--lengths 1024,...,16384]
        [--paths reference,fused,chunked,dot_product] [--set model.dtype=bfloat16 ...]
    python benchmarks/attention_memory.py --paths chunked --vocab 50257 --set model.loss_chunk=512

One GPT-2-small-wide block (12 heads of 64, width 768) over a byte vocabulary, so that the
logits do not hide attention (--vocab 50257: GPT-2's, where they do). On a GPU, 'dot_product'
in bf16 is cuDNN's flash attention.
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp

from headwise.model import ModelConfig, init_params, loss
from machine import describe

MiB = 2 ** 20


def gradient_temp_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, t: loss(p, t, t, cfg)))
    return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def model_config(args, path: str, T: int) -> ModelConfig:
    overrides = dict(item.removeprefix("model.").split("=", 1) for item in args.set)
    overrides = {k: int(v) if v.isdigit() else v for k, v in overrides.items()}
    cfg = ModelConfig.preset("gpt2-small", n_layers=args.layers, vocab_size=args.vocab,
                             context_length=T, attention=path)
    return dataclasses.replace(cfg, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--paths", default="reference,fused,chunked,dot_product")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--set", nargs="*", default=[], help="model.FIELD=VALUE")
    args = parser.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    print(describe())
    print(f"gradient temp MiB, {args.layers} block(s) 768 wide, 12 heads of 64, vocabulary "
          f"{args.vocab}, batch {args.batch} {' '.join(args.set)}")
    print(f"{'path':<12}" + "".join(f"{f'T={t}':>11}" for t in lengths) + "   x per doubling")
    for path in args.paths.split(","):
        temps = [gradient_temp_bytes(model_config(args, path, T), args.batch, T) for T in lengths]
        growth = " ".join(f"{b / a:.2f}" for a, b in zip(temps, temps[1:]))
        print(f"{path:<12}" + "".join(f"{t / MiB:11,.0f}" for t in temps) + f"   {growth}",
              flush=True)


if __name__ == "__main__":
    main()
