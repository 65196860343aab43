#!/usr/bin/env bash
# Everything headwise measures on a GPU, in one command that ends in under 8 minutes on an H100:
#   1. GPT-2 small, bf16, training 50 steps with each attention path: tokens/s, MFU against the
#      card's dense bf16 peak, compiled memory (benchmarks/gpu_train.py), and a profile of the
#      first path's steps ($OUT/perfetto_trace.json.gz, summed by op);
#   2. the same model in PyTorch (benchmarks/torch_gpt2.py), decoding against transformers'
#      generate, and the parallel-heads timing;
#   3. the device-independent tests, run on the GPU (float32 matmuls at full precision: the
#      tests' bounds are float32's, and JAX's default on NVIDIA is TF32).
# Figures go to $OUT (default /tmp/headwise-gpu) and the tables to stdout.
#   bash benchmarks/gpu.sh            # on a machine with jax[cuda], flax, optax, orbax, torch
# Wheels missing there (tomli-w) may be put in .whl/ beforehand: they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/headwise-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Running pip as" || true
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, optax, torch, transformers, platform
print('python', platform.python_version(), 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)
print(jax.devices())"

section() { echo; echo "=== $1 ($(date +%T))"; }

section "GPT-2 small, bf16, each attention path"
# 'fused' and 'reference' keep every layer's f32 pattern: at batch 32 they need 59 GiB more.
timeout 240 python3 benchmarks/gpu_train.py --config gpt2_small --batch 32 --steps 50 --paths dot_product,chunked \
    --json "$OUT/train.jsonl" --trace "$OUT" 2>&1 | tee "$OUT/train.log" | grep -v "^[WI][0-9]"
section "GPT-2 small, bf16, rematerialized (same batch; the scan rolled in two, as remat needs)"
timeout 100 python3 benchmarks/gpu_train.py --config gpt2_small --batch 32 --steps 30 \
    --paths dot_product --remat dots,full --set model.scan_unroll=6 --json "$OUT/train.jsonl" 2>&1 |
    tee -a "$OUT/train.log" | tail -n 3

section "GPT-2 small, bf16, the loss's logits 256 positions at a time (model.loss_chunk)"
timeout 80 python3 benchmarks/gpu_train.py --config gpt2_small --batch 32 --steps 30 \
    --paths dot_product --set model.loss_chunk=256 --json "$OUT/train.jsonl" 2>&1 |
    tee -a "$OUT/train.log" | tail -n 2

section "the PyTorch reference: transformers' GPT-2 small, bf16 autocast, SDPA, fused AdamW"
timeout 110 python3 benchmarks/torch_gpt2.py --batch 32 --steps 30 --compile 2>&1 |
    grep -v "loss_type" | tee "$OUT/torch.log" | tail -n 3

section "decoding"
timeout 100 python3 benchmarks/decode.py --size gpu 2>&1 | tee "$OUT/decode.log" | grep -v "^[WI][0-9]" | tail -n 16

if [ -f benchmarks/parallel_heads.py ]; then
    section "heads and positions in parallel"
    timeout 60 python3 benchmarks/parallel_heads.py 2>&1 | tee "$OUT/parallel_heads.log" | tail -n 12
fi
section "tests on the GPU"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -p no:cacheprovider \
    tests/test_model.py tests/test_reference.py tests/test_decode.py tests/test_hf.py \
    -k "not sharded" 2>&1 | tee "$OUT/tests.log" | tail -n 15

section "done"
