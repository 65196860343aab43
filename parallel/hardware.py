"""Accelerators as the plan sees them: peak FLOP/s, memory, and the bandwidths between devices."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device (GPU, TPU chip or CPU) and the links between devices, in bytes and seconds.

    `intra_bw` is one device's one-way bandwidth to the devices of its own node (NVLink, or a
    TPU's ICI link along one torus axis); `inter_bw` its share of the links between nodes
    (InfiniBand / DCN). A mesh axis whose devices fit in one node runs at `intra_bw`."""

    name: str
    peak_flops: float  # dense, per device, in the `dtype` below
    dtype: str
    memory: float  # bytes per device
    hbm_bw: float  # bytes/s between the device and its memory
    intra_bw: float
    inter_bw: float
    node_size: int  # devices that share the fast links
    source: str

    @property
    def is_gpu(self) -> bool:
        return self.name[0] in "ah"  # h100, h200, a100


GiB = 1024**3
HARDWARE = {h.name: h for h in (
    Hardware("h100", 989e12, "bfloat16", 80e9, 3.35e12, 450e9, 50e9, 8,
             "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16, 80 GB HBM3 at 3.35 TB/s, NVLink4 "
             "900 GB/s both ways (450 one way); DGX H100: one 400 Gb/s NDR InfiniBand port "
             "(50 GB/s) per GPU"),
    Hardware("h200", 989e12, "bfloat16", 141e9, 4.8e12, 450e9, 50e9, 8,
             "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16, 141 GB HBM3e at 4.8 TB/s, NVLink4 "
             "900 GB/s both ways; one 400 Gb/s InfiniBand port per GPU"),
    Hardware("a100", 312e12, "bfloat16", 80e9, 2.039e12, 300e9, 25e9, 8,
             "NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s dense BF16, 80 GB HBM2e at 2,039 GB/s, "
             "NVLink3 600 GB/s both ways; DGX A100: one 200 Gb/s HDR InfiniBand port per GPU"),
    # TPU figures from the JAX scaling book, 'How to Think About TPUs' (its chip and ICI
    # tables): a pod is one ICI torus, so every mesh axis runs on ICI (node_size = pod size).
    # One torus axis of a full pod wraps around, so a ring over it uses both directions of
    # a link: the bidirectional per-link figure.
    Hardware("tpu-v4", 2.75e14, "bfloat16", 32e9, 1.2e12, 9e10, 9e10, 4096,
             "JAX scaling book, TPU chip table: v4p 2.75e14 BF16 FLOP/s, 32 GB HBM at 1.2e12 B/s; "
             "ICI 4.5e10 B/s per link one way, 9e10 both ways"),
    Hardware("tpu-v5e", 1.97e14, "bfloat16", 16e9, 8.1e11, 9e10, 9e10, 256,
             "JAX scaling book, TPU chip table: v5e 1.97e14 BF16 FLOP/s, 16 GB HBM at 8.1e11 B/s; "
             "ICI 4.5e10 B/s per link one way, 9e10 both ways; pods of 16x16"),
    Hardware("tpu-v5p", 4.59e14, "bfloat16", 96e9, 2.8e12, 1.8e11, 1.8e11, 8960,
             "JAX scaling book, TPU chip table: v5p 4.59e14 BF16 FLOP/s, 96 GB HBM at 2.8e12 B/s; "
             "ICI 9e10 B/s per link one way, 1.8e11 both ways; pods of 16x20x28"),
    Hardware("tpu-v6e", 9.2e14, "bfloat16", 32e9, 1.6e12, 1.8e11, 1.8e11, 256,
             "JAX scaling book, TPU chip table: v6e 9.20e14 BF16 FLOP/s, 32 GB HBM at 1.6e12 B/s; "
             "ICI 9e10 B/s per link one way, 1.8e11 both ways; pods of 16x16"),
    # This machine's CPU, measured (2 cores, f32 2048x2048 matmul in jax, best of 10 at load
    # 1.5: 3.1e10 before, taken under a load of 15+, made CPU runs report an MFU over 100 %;
    # numpy copy of 256 MB for memory; simulated devices share the cores and the RAM).
    Hardware("cpu", 2.0e11, "float32", 23 * GiB, 3.6e9, 3.6e9, 3.6e9, 1024,
             "measured here: a 2-core Xeon, jit(a @ a) on 2048x2048 f32 at 2.0e11 FLOP/s, "
             "np.copyto of 256 MB at 3.6e9 B/s, 23 GiB of RAM; simulated devices share all three"),
)}
ALIASES = {"tpu-v4p": "tpu-v4", "v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e",
           "tpu-v5-lite": "tpu-v5e", "h100-sxm": "h100", "a100-80gb": "a100"}


def get_hardware(name: str) -> Hardware:
    """The table's entry for `name` (case-insensitive; 'v5p' = 'tpu-v5p')."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in HARDWARE:
        raise ValueError(f"--hardware {name!r} is not in the table; choose one of: "
                         f"{', '.join(HARDWARE)}")
    return HARDWARE[key]
