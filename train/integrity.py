"""How a checkpoint proves it is whole and belongs to this run: checksums of its arrays, no
links out of it, and a fingerprint of the model and tokenizer that trained it."""
import dataclasses
import hashlib
import pathlib

import jax
import jax.numpy as jnp

from headwise.model import ModelConfig

# Fields that choose only how the same function is computed; any other change is another model.
RUNTIME_FIELDS = frozenset({"attention", "attention_chunk", "scan_unroll", "dtype", "remat",
                            "loss_chunk"})


def _flat_positions(x: jax.Array) -> jax.Array:
    """Each element's index in the flattened array (mod 2**32), laid out like `x`: iotas, not
    a reshape, which an explicitly sharded array would refuse."""
    sharding, stride = jax.typeof(x).sharding, 1
    positions = jnp.zeros(x.shape, jnp.uint32)
    for dim in reversed(range(x.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim, out_sharding=sharding)
        positions, stride = positions + iota * jnp.uint32(stride % 2**32), stride * x.shape[dim]
    return positions


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 sum of the bits weighted by position (so a swap shows too), mod 2**32: integer
    arithmetic, so the same on any mesh whatever the order of the reduction."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    weights = _flat_positions(bits) * jnp.uint32(2654435761) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(tree):
    return jax.tree.map(_leaf_checksum, tree)


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def checksums(tree) -> dict[str, int]:
    """{"params/embed/token": checksum, ...} of a tree of arrays (sharded or not)."""
    sums = jax.device_get(_checksums(tree))
    return {path_name(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def mismatches(tree, saved: dict[str, int]) -> list[str]:
    """The arrays of `tree` whose checksum differs from the one saved with them."""
    now = checksums(tree)
    return [name for name, value in now.items() if saved.get(name) != value]


def escaping_links(folder: pathlib.Path) -> list[str]:
    """Links inside `folder` that point outside it (a checkpoint is read as it is: a link out
    could make a restore read, or a later clean-up delete, someone else's files)."""
    folder = pathlib.Path(folder)  # an etils path would refuse the recursive glob
    root = folder.resolve()
    return [f"{p.relative_to(folder)} -> {p.readlink()}" for p in sorted(folder.rglob("*"))
            if p.is_symlink() and not p.resolve().is_relative_to(root)]


def fingerprint(cfg: ModelConfig, tokenizer) -> dict:
    """What a run must share with a checkpoint to resume from it: the model's defining fields
    and the tokenizer (its kind, size and a hash of its JSON). A mesh is free to differ."""
    model = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    if tokenizer is None:
        return {"model": model, "tokenizer": None}
    text = tokenizer.to_json()
    return {"model": model, "tokenizer": {
        "kind": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size),
        "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}}


def fingerprint_differences(saved: dict, wanted: dict) -> list[str]:
    """Each way a run's fingerprint differs from a checkpoint's, as 'what: checkpoint X, this
    run Y'. Fields one side lacks (another headwise version) are not compared."""
    saved_model, model = saved.get("model") or {}, wanted.get("model") or {}
    lines = [f"model.{k}: checkpoint {saved_model[k]!r}, this run {model[k]!r}"
             for k in model if k in saved_model and saved_model[k] != model[k]]
    mine, theirs = wanted.get("tokenizer"), saved.get("tokenizer")
    if mine and theirs and mine != theirs:
        lines.append(f"tokenizer: checkpoint {theirs['kind']} of {theirs['vocab_size']} tokens "
                     f"(sha256 {theirs['sha256']}), this run {mine['kind']} of "
                     f"{mine['vocab_size']} tokens (sha256 {mine['sha256']})")
    return lines


def first_line_of_cause(error: BaseException) -> str:
    """The innermost cause of `error`, in one line: TensorStore's 'Error reading X ... ' rather
    than the 60 lines of its spec that wrap it."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:400]
