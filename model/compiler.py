"""The XLA options headwise compiles its programs with, per platform."""

# XLA:CPU generates code at LLVM's -O1, not -O2: code generation is most of a CPU compile, and -O2
# buys these programs nothing measurable (the fusion emitters vectorize their loops themselves, the
# matmuls are library calls). GPT-2 small's forward+backward compiles in 0.73-0.85x the time
# (2.2-2.8 s -> 1.8-2.1 s on a 2-core Xeon), the train steps run as fast (docs/benchmarks.md,
# benchmarks/cpu_step.py --compile); jax.random's threefry over a 3- or 4-axis parameter
# compiles in 0.25-0.32 s instead of 1.1-1.9 s. Other platforms compile as before.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compiler_options(platform: str) -> dict:
    """The XLA options headwise's programs are compiled with on `platform` ("cpu", "gpu", "tpu")."""
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}
