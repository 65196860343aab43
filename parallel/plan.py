"""The per-device plan: what one training step costs each device of a mesh, before compiling.

Memory: parameters, gradients and optimizer state from the parameter specs and the rules;
activations from JAX's own list of what autodiff saves for the backward pass. Time: the
model's FLOPs (`flops_per_token`) at the device's peak, and each collective the strategy needs
at its link's bandwidth, overlapped as the JAX scaling book assumes (step = the larger).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints, as data
from jax.sharding import AbstractMesh

from headwise.model import ModelConfig, ParamSpec, count_params, flops_per_token, loss, param_specs

from .checks import axis_size, check_batch_divisible, check_mesh_used, check_params_divisible
from .hardware import Hardware
from .mesh import AXES, DATA, FSDP, TENSOR
from .rules import as_rules, spec


def abstract_mesh(sizes: dict) -> AbstractMesh:
    """A mesh of any size without devices: {'data': 8, 'fsdp': 16, 'tensor': 8}."""
    return AbstractMesh(tuple(int(sizes.get(a, 1)) for a in AXES), AXES)


def _names(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def local_shape(shape: tuple, axes: tuple, mesh, rules) -> tuple:
    """One array's shape on one device, its logical `axes` mapped to the mesh by `rules`."""
    entries = tuple(spec(axes, rules)) + (None,) * len(shape)
    return tuple(d // axis_size(mesh, e) for d, e in zip(shape, entries))


def _param_leaves(cfg: ModelConfig) -> list:
    leaves = jax.tree_util.tree_flatten_with_path(
        param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    return [("/".join(str(k.key) for k in path), s) for path, s in leaves]


def batch_axes(mesh, rules) -> tuple:
    """The mesh axes (larger than 1) the batch is split over: gradients are summed over them."""
    return tuple(a for a in _names(spec(("batch",), rules)[0]) if mesh.shape[a] > 1)


def activation_split(logical: str, mesh, rules) -> int:
    """Devices an activation's `logical` axis (heads, mlp, vocab) is split over: the mesh axes
    its rule names, less those the batch already takes (an array uses a mesh axis once)."""
    taken = set(_names(spec(("batch",), rules)[0]))
    return math.prod(mesh.shape[a] for a in _names(spec((logical,), rules)[0]) if a not in taken)


def local_model(cfg: ModelConfig, mesh, rules) -> ModelConfig:
    """The model one device runs its activations through: whole heads, MLP columns and
    vocabulary rows divided by the devices that split them (tensor parallelism)."""
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // activation_split("heads", mesh, rules),
                               d_mlp=cfg.d_mlp // activation_split("mlp", mesh, rules),
                               vocab_size=cfg.vocab_size // activation_split("vocab", mesh, rules))


@functools.lru_cache(maxsize=64)
def saved_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Bytes autodiff keeps from the forward pass for the backward pass of `loss` (every block's
    residuals, stacked by the scan, and the logits'), the parameters themselves left out:
    JAX's own inventory (jax.ad_checkpoint.print_saved_residuals lists the same)."""
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.param_dtype)),
                          param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    found = saved_residuals(lambda p, x, y: loss(p, x, y, cfg), params, tokens, tokens)
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a, why in found
               if not why.startswith(("from the argument", "from a literal", "from a constant")))


def activation_bytes(cfg: ModelConfig, mesh, rules, batch_local: int, seq: int) -> tuple[int, int]:
    """(activations, weight copies) kept for the backward pass, per device. What grows with the
    batch is activations; what does not is weights reshaped or stacked for a matmul (e.g. the
    fused query/key/value matrix), held as sharded as the weights."""
    local = local_model(cfg, mesh, rules)
    one, two = saved_bytes(local, 1, seq), saved_bytes(local, 2, seq)
    per_row = two - one
    weights = (one - per_row) // math.prod(
        mesh.shape[a] for a in _names(spec(("embed",), rules)[0]))
    return per_row * batch_local, max(weights, 0)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective a step needs: over which mesh axes, how many bytes each device
    hands it (its operands, summed over the step), how many it sends, and how long that takes."""

    what: str
    kind: str  # all-gather, reduce-scatter, all-reduce, all-to-all
    axes: tuple
    operand_bytes: float
    wire_bytes: float
    seconds: float


def _wire_factor(kind: str, n: int) -> float:
    """Bytes a device sends per operand byte in a ring (the scaling book's collective costs)."""
    return {"all-gather": n - 1, "reduce-scatter": (n - 1) / n,
            "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n}[kind]


def link_bandwidth(axes: tuple, mesh, hw: Hardware) -> float:
    """A collective over `axes` runs at NVLink/ICI speed when its devices sit in one node (the
    mesh is laid out row-major over AXES, so the last axis is the innermost), else at the
    per-device share of the links between nodes."""
    sizes = [mesh.shape[a] for a in AXES]
    span = max(math.prod(sizes[AXES.index(a):]) for a in axes)
    return hw.intra_bw if span <= hw.node_size else hw.inter_bw


def _collective(what, kind, axes, operand, mesh, hw) -> Collective:
    n = math.prod(mesh.shape[a] for a in axes)
    wire = _wire_factor(kind, n) * operand
    return Collective(what, kind, tuple(axes), operand, wire, wire / link_bandwidth(axes, mesh, hw))


def _param_collectives(cfg: ModelConfig, mesh, rules) -> list[tuple]:
    """(what, kind, axes, operand bytes) for the parameters: FSDP's all-gathers (forward, and
    again in the backward pass for the blocks' weights: the scan keeps only their shards) and
    the gradients' reduction over the batch axes (reduce-scatter where the parameter is sharded
    over them, all-reduce where it is replicated)."""
    item, batch, out = np.dtype(cfg.param_dtype).itemsize, batch_axes(mesh, rules), []
    for name, s in _param_leaves(cfg):
        local = math.prod(local_shape(s.shape, s.axes, mesh, rules)) * item
        used = {a for e in spec(s.axes, rules) for a in _names(e)}
        scattered = tuple(a for a in batch if a in used)
        replicated = tuple(a for a in batch if a not in used)
        if scattered:
            full = local * math.prod(mesh.shape[a] for a in scattered)
            out.append(("FSDP weights, forward", "all-gather", scattered, local))
            if name.startswith("blocks/") and not name.endswith("bias"):
                out.append(("FSDP weights, backward", "all-gather", scattered, local))
            out.append(("gradients", "reduce-scatter", scattered, full))
        uses = 2 if name == "embed/token" and cfg.tie_embeddings and not scattered else 1
        if replicated:  # a tied embedding's two uses are reduced one by one (see the docs)
            out.append(("gradients", "all-reduce", replicated, uses * local))
    return out


def _activation_collectives(cfg: ModelConfig, mesh, rules, batch_local: int, seq: int) -> list:
    """Tensor parallelism's all-reduces of [B, T, D] activations (Megatron: one after the
    attention and one after the MLP in the forward pass, their mirrors in the backward), the
    split vocabulary's (embedding lookup, unembedding's backward, the softmax's max and sum),
    and FSDP's embedding lookup, which XLA does on width-sharded rows and all-to-alls back."""
    act = np.dtype(cfg.dtype).itemsize
    x_bytes, row_bytes = batch_local * seq * cfg.d_model * act, batch_local * seq * 4
    out = []
    for logical, what in (("heads", "attention output"), ("mlp", "MLP output")):
        axes = _split_axes(logical, mesh, rules)
        if axes:
            out.append((f"tensor parallel: {what}, forward and backward", "all-reduce", axes,
                        2 * cfg.n_layers * x_bytes))
    vocab = _split_axes("vocab", mesh, rules)
    if vocab:
        out.append(("split vocabulary: embedding and unembedding", "all-reduce", vocab,
                    2 * x_bytes + 4 * row_bytes))
    embed = tuple(a for a in batch_axes(mesh, rules)
                  if a in _names(spec(("embed",), rules)[0]))
    if embed:  # with a split vocabulary too: the rows are looked up, then all-to-all'd
        out.append(("FSDP embedding lookup, forward and backward", "all-to-all", embed,
                    2 * x_bytes))
    return out


def _split_axes(logical: str, mesh, rules) -> tuple:
    taken = set(_names(spec(("batch",), rules)[0]))
    return tuple(a for a in _names(spec((logical,), rules)[0])
                 if a not in taken and mesh.shape[a] > 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One device's share of one training step."""

    model: ModelConfig
    mesh: dict
    strategy: str
    hardware: Hardware
    batch: int
    seq: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    weight_copy_bytes: int
    flops_per_step: float  # the whole step, all devices
    collectives: tuple

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activation_bytes + self.weight_copy_bytes)

    @property
    def compute_s(self) -> float:
        """The model's FLOPs (and remat's and the chunked loss's recomputation) at the device's
        peak. The chunked loss computes the logits once more: 2·D·V FLOPs a token."""
        recompute = RECOMPUTE.get(getattr(self.model, "remat", "none"), 1.0)
        logits = (2 * self.model.d_model * self.model.vocab_size * self.batch * self.seq
                  if 0 < self.model.loss_chunk < self.seq else 0)
        return ((recompute * self.flops_per_step + logits) / self.devices
                / self.hardware.peak_flops)

    @property
    def model_compute_s(self) -> float:
        return self.flops_per_step / self.devices / self.hardware.peak_flops

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def hbm_bytes(self) -> float:
        """Bytes between the device and its memory per step, at least: the weights read in the
        forward and twice in the backward pass, gradients written and read, the optimizer
        state read and written, the new weights written, activations written and read."""
        return (4 * self.params_bytes + 2 * self.grads_bytes + 2 * self.optimizer_bytes
                + 2 * (self.activation_bytes + self.weight_copy_bytes))

    @property
    def memory_s(self) -> float:
        return self.hbm_bytes / self.hardware.hbm_bw

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "communication": self.comm_s,
                 "memory-bandwidth": self.memory_s}
        return max(times, key=times.get)

    @property
    def step_time_s(self) -> float:
        """The roofline: compute, collectives and memory traffic overlapped, the slowest wins."""
        return max(self.compute_s, self.comm_s, self.memory_s)

    @property
    def mfu(self) -> float:
        """Model FLOPs over what the devices could do in the step (recomputation is not
        model FLOPs)."""
        return self.model_compute_s / self.step_time_s

    @property
    def intensity(self) -> float:
        """FLOPs per byte sent over the links: against the hardware's peak / bandwidth."""
        wire = sum(c.wire_bytes for c in self.collectives)
        return math.inf if wire == 0 else self.flops_per_step / self.devices / wire

    @property
    def critical_intensity(self) -> float:
        """The intensity above which the links keep up: peak FLOP/s over the slowest link in use."""
        bws = [c.wire_bytes / c.seconds for c in self.collectives if c.seconds]
        return self.hardware.peak_flops / min(bws) if bws else 0.0

    def as_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "mesh": self.mesh,
                "strategy": self.strategy, "hardware": self.hardware.name,
                "hardware_source": self.hardware.source, "batch": self.batch, "seq": self.seq,
                "devices": self.devices,
                "params_bytes_per_device": self.params_bytes,
                "grads_bytes_per_device": self.grads_bytes,
                "optimizer_bytes_per_device": self.optimizer_bytes,
                "activation_bytes_per_device": self.activation_bytes,
                "weight_copy_bytes_per_device": self.weight_copy_bytes,
                "total_bytes_per_device": self.total_bytes,
                "memory_per_device": self.hardware.memory,
                "fits": self.total_bytes <= self.hardware.memory,
                "flops_per_step": self.flops_per_step,
                "flops_per_device": self.flops_per_step / self.devices,
                "collective_bytes_per_step": sum(c.operand_bytes for c in self.collectives),
                "collective_wire_bytes_per_step": sum(c.wire_bytes for c in self.collectives),
                "collectives": [dataclasses.asdict(c) for c in self.collectives],
                "compute_s": self.compute_s, "comm_s": self.comm_s, "memory_s": self.memory_s,
                "step_time_s": self.step_time_s, "mfu": self.mfu, "bound": self.bound,
                "intensity_flops_per_byte": self.intensity,
                "critical_intensity_flops_per_byte": self.critical_intensity}


def _merge(items: list, mesh, hw) -> tuple:
    """Items of the same (what, kind, axes) summed into one Collective."""
    sums = {}
    for what, kind, axes, operand in items:
        sums[(what, kind, axes)] = sums.get((what, kind, axes), 0) + operand
    return tuple(_collective(w, k, a, b, mesh, hw) for (w, k, a), b in sums.items())


def traced_model(cfg: ModelConfig, hw: Hardware) -> ModelConfig:
    """The model whose saved residuals stand for `cfg`'s on `hw`. On a GPU in 16 bits the
    'dot_product' kernel is cuDNN's flash attention (model.attention._flash_causal), which
    keeps q, k, v, the output and each row's softmax statistics, not the [T, S] patterns that
    XLA's version (what tracing here sees) keeps: the 'chunked' kernel keeps the same."""
    flash = hw.is_gpu and cfg.dtype in ("bfloat16", "float16") and cfg.attention == "dot_product"
    return dataclasses.replace(cfg, attention="chunked") if flash else cfg


# FLOPs the hardware does per model FLOP: full remat runs each block's forward pass twice
# (4 of 3 passes' worth, as the PaLM paper counts); 'dots' keeps the matmuls' outputs, so
# only cheap elementwise work is redone.
RECOMPUTE = {"none": 1.0, "dots": 1.0, "full": 4 / 3}


def plan_step(cfg: ModelConfig, mesh_sizes: dict, rules, hw: Hardware, batch: int,
              seq: int | None = None, strategy: str = "", optimizer_moments: float = 2.0) -> Plan:
    """The plan of one training step of `batch` sequences of `seq` tokens (default: the
    context). `optimizer_moments`: optimizer state per parameter, in parameters (AdamW: 2).
    Raises a ValueError naming the field and the fix if the mesh cannot hold the model."""
    seq = cfg.context_length if seq is None else seq
    if not 0 < seq <= cfg.context_length:
        raise ValueError(f"--context {seq} must be in 1..{cfg.context_length} "
                         f"(ModelConfig.context_length)")
    mesh, rules = abstract_mesh(mesh_sizes), as_rules(rules)
    check_mesh_used(mesh, rules)
    check_params_divisible(cfg, mesh, rules)
    check_batch_divisible(mesh, rules, batch)
    item = np.dtype(cfg.param_dtype).itemsize
    params = sum(math.prod(local_shape(s.shape, s.axes, mesh, rules)) for _, s in _param_leaves(cfg))
    batch_local = batch // math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))
    acts, copies = activation_bytes(traced_model(cfg, hw), mesh, rules, batch_local, seq)
    items = (_param_collectives(cfg, mesh, rules)
             + _activation_collectives(cfg, mesh, rules, batch_local, seq))
    return Plan(cfg, dict(mesh.shape), strategy, hw, batch, seq, params * item, params * item,
                int(optimizer_moments * params * item), acts, copies,
                flops_per_token(cfg, seq) * batch * seq, _merge(items, mesh, hw))


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def check_fits(p: Plan) -> str | None:
    """None if the step fits in the device's memory, else why not and what would: more
    sharding if the state alone is too big, else fewer rows per device (or remat)."""
    memory, name = p.hardware.memory, p.hardware.name
    if p.total_bytes <= memory:
        return None
    state = p.params_bytes + p.grads_bytes + p.optimizer_bytes + p.weight_copy_bytes
    head = (f"does not fit: {_size(p.total_bytes)} per device against {name}'s "
            f"{_size(memory)}")
    if state > memory:
        need = math.ceil(state * p.mesh[FSDP] * p.mesh[TENSOR] / memory)
        return (f"{head}; the parameters, gradients and optimizer state alone are "
                f"{_size(state)}: shard them over {FSDP} x {TENSOR} >= {need} (now "
                f"{p.mesh[FSDP] * p.mesh[TENSOR]})")
    rows = p.batch // (p.mesh[DATA] * p.mesh[FSDP])
    fit = int((memory - state) // (p.activation_bytes / rows))
    fixes = [f"--batch {fit * p.mesh[DATA] * p.mesh[FSDP]:,} ({fit} rows per device; "
             f"train.grad_accum keeps the global batch)" if fit else
             "fewer tokens per row (--context)"]
    vocab = p.model.vocab_size // p.mesh[TENSOR]  # as the tensor axis splits it
    logits_bytes = rows * p.seq * vocab * 4  # f32, kept whole for the backward
    if not p.model.loss_chunk and p.seq > 512 and logits_bytes > p.activation_bytes / 4:
        fixes.append(f"--set model.loss_chunk=512 (the loss's logits, {_size(logits_bytes)} "
                     f"here, 512 positions at a time)")
    if getattr(p.model, "remat", "none") != "full":
        rolled = (f" model.scan_unroll={max(1, p.model.n_layers // 2)}"
                  if getattr(p.model, "scan_unroll", 1) >= p.model.n_layers > 1 else "")
        fixes.append(f"--set model.remat=full{rolled} (keep only each block's input)")
    return (f"{head}: activations for {rows} rows per device are {_size(p.activation_bytes)}; "
            f"try " + " or ".join(fixes))


def format_plan(p: Plan) -> str:
    """The plan as the terminal shows it."""
    c, hw = count_params(p.model), p.hardware
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"{c['total']:,} parameters ({p.model.n_layers} layers, {p.model.n_heads} heads of "
             f"{p.model.d_head}, d_model {p.model.d_model:,}) on {p.devices:,} x {hw.name} "
             f"({mesh}, strategy {p.strategy}); batch {p.batch:,} x {p.seq:,} tokens",
             "", "per device:"]
    for label, n in (("parameters", p.params_bytes), ("gradients", p.grads_bytes),
                     ("optimizer state", p.optimizer_bytes), ("activations", p.activation_bytes),
                     ("weight copies kept for backward", p.weight_copy_bytes),
                     ("total", p.total_bytes)):
        lines.append(f"  {label:<34}{_size(n):>12}")
    lines.append(f"  {'memory (' + hw.name + ')':<34}{_size(hw.memory):>12}"
                 f"   {'fits' if p.total_bytes <= hw.memory else 'DOES NOT FIT'}")
    lines += ["", f"FLOPs per step: {p.flops_per_step:.4g} ({p.flops_per_step / p.devices:.4g} "
                  f"per device) -> {_seconds(p.compute_s)} at {hw.peak_flops:.3g} FLOP/s",
              "", "collectives per step (operand bytes per device; time at the link's bandwidth):"]
    for col in p.collectives:
        lines.append(f"  {col.kind:<15}{'x'.join(col.axes):<12}{_size(col.operand_bytes):>10}"
                     f"{_seconds(col.seconds):>11}  {col.what}")
    lines += ["", f"step: compute {_seconds(p.compute_s)}, communication {_seconds(p.comm_s)}, "
                  f"memory traffic {_seconds(p.memory_s)} ({_size(p.hbm_bytes)} at "
                  f"{hw.hbm_bw:.3g} B/s)",
              f"  -> {_seconds(p.step_time_s)} if they overlap ({p.bound}-bound), MFU {p.mfu:.1%}",
              f"arithmetic intensity {p.intensity:.4g} FLOPs per byte sent, against "
              f"{p.critical_intensity:.4g} (peak FLOP/s over the slowest link used)",
              "", f"hardware: {hw.source}"]
    if p.model.dtype != hw.dtype:
        lines.append(f"note: the model computes in {p.model.dtype}; the peak is {hw.dtype}'s "
                     f"(--set model.dtype={hw.dtype})")
    return "\n".join(lines)
