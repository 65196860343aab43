"""The PyTorch reference for benchmarks/gpu_train.py: transformers' GPT-2 small trained as
nanoGPT trains it on a GPU (bf16 autocast, SDPA flash attention, fused AdamW, optionally
torch.compile), on random tokens at the same batch and context: tokens/s and MFU counted with
headwise's FLOPs per token, so the two tables divide.

    python benchmarks/torch_gpt2.py [--batch 32] [--steps 30] [--compile]
"""
import argparse
import time

import torch
import transformers

from headwise.model import ModelConfig, flops_per_token

H100_BF16_DENSE = 989e12  # the same peak gpu_train.py uses (train/metrics.py)


def measure(model, optimizer, batch_BT: torch.Tensor, steps: int) -> float:
    """Seconds per step after three warm-up steps."""
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch_BT, labels=batch_BT).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile's model")
    args = parser.parse_args()
    cfg = ModelConfig.preset("gpt2-small")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        attn_implementation="sdpa")).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), fused=True)
    batch_BT = torch.randint(0, cfg.vocab_size, (args.batch, cfg.context_length), device="cuda")
    tokens = args.batch * cfg.context_length
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name()}; GPT-2 small, batch {args.batch}")
    variants = [("eager", model)] + ([("compiled", torch.compile(model))] if args.compile else [])
    for name, m in variants:
        seconds = measure(m, optimizer, batch_BT, args.steps)
        mfu = flops_per_token(cfg) * tokens / seconds / H100_BF16_DENSE
        print(f"torch {name:<9}{tokens / seconds:11,.0f} tokens/s{1e3 * seconds:9.1f} ms/step"
              f"  MFU {mfu:.1%}", flush=True)


if __name__ == "__main__":
    main()
