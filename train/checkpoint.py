"""Checkpoints through orbax: async, atomic, the newest N kept, restored onto any shardings."""
import functools
import json
import pathlib
import sys
import tomllib

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from headwise.model import ModelConfig, init_params

from . import integrity as integrity_lib, numbers
from .faults import RunFault
from .tokenizers import tokenizer_from_json

SUBDIR = "checkpoints"
DAMAGED = "damaged_checkpoints"  # where a checkpoint that cannot be read is moved aside
INTEGRITY = "integrity"  # JSON saved with the state: its checksums and the run's fingerprint
_FIX = "use a fresh --run-dir, or the model and optimizer config of the run that wrote it"


def _registry() -> ocp.handlers.CheckpointHandlerRegistry:
    """`state` is a standard pytree (plus a partial reader for params alone); `config` is JSON."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    standard = ocp.StandardCheckpointHandler()
    registry.add("state", ocp.args.StandardSave, standard)
    registry.add("state", ocp.args.StandardRestore, standard)
    registry.add("state", ocp.args.PyTreeRestore)
    registry.add("config", ocp.args.JsonSave)
    registry.add("config", ocp.args.JsonRestore)
    registry.add(INTEGRITY, ocp.args.JsonSave)
    registry.add(INTEGRITY, ocp.args.JsonRestore)
    return registry


def open_manager(run_dir, *, keep: int = 3, save_every: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """A manager for `run_dir/checkpoints`. Close it (or use `with`) so pending saves land."""
    for name, value in (("keep", keep), ("save_every", save_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"checkpoint {name} must be a positive integer, got {value!r}")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # half-written saves of a crashed run
    return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / SUBDIR, options=options,
                                 handler_registry=_registry())


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def save(manager: ocp.CheckpointManager, step: int, state: dict, config: dict, *,
         force: bool = False, fingerprint: dict | None = None) -> bool:
    """Start saving `state` and `config` at `step` if due (or `force`); True if it started.

    Returns once the arrays are copied to host, so the caller may donate them right away.
    A step already saved is skipped (False): e.g. a final forced save after a periodic one.
    Each array's checksum goes with it, so a restore notices bytes garbled on disk;
    `fingerprint` (what the run must match to resume from it) too.
    """
    try:  # here, not in the background thread where the error would surface late
        json.dumps(config)
    except TypeError as error:
        raise ValueError(f"checkpoint config must be JSON-able: {error}") from None
    if int(step) in manager.all_steps():
        return False
    key = state["key"]
    stored = {**state, "key": jax.random.key_data(key) if _is_key(key) else key}
    integrity = {"checksums": integrity_lib.checksums(stored), "fingerprint": fingerprint}
    args = ocp.args.Composite(state=ocp.args.StandardSave(stored),
                              config=ocp.args.JsonSave(config),
                              **{INTEGRITY: ocp.args.JsonSave(integrity)})
    return manager.save(int(step), args=args, force=force)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest finished checkpoint's step, or None. Waits for a save in flight."""
    manager.wait_until_finished()
    return manager.latest_step()


def _single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(x) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of `x` (an array or ShapeDtypeStruct); one device if unsharded."""
    sharding = getattr(x, "sharding", None) or _single_device()
    if _is_key(x):  # stored as its uint32 data; a key's sharding also fits that data
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _shape_dtype(leaf) -> str:
    """'(4, 8) float32': what the compatibility check compares and prints."""
    return f"{tuple(leaf.shape)} {jax.numpy.dtype(leaf.dtype).name}"


def _differences(stored: dict, wanted: dict, partial: bool) -> list[str]:
    lines = [f"{'/'.join(k)}: not in the checkpoint" for k in wanted if k not in stored]
    if not partial:
        lines += [f"{'/'.join(k)}: in the checkpoint, not in the target"
                  for k in stored if k not in wanted]
    lines += [f"{'/'.join(k)}: checkpoint has {_shape_dtype(stored[k])}, target wants "
              f"{_shape_dtype(leaf)}" for k, leaf in wanted.items()
              if k in stored and _shape_dtype(stored[k]) != _shape_dtype(leaf)]
    return lines


def _check_compatible(manager, step: int, target: dict, *, partial: bool = False):
    """Compare `target` with the checkpoint's metadata (no array is read); ValueError if off."""
    stored = ocp.tree.to_flat_dict(manager.item_metadata(step)["state"].tree)
    wanted = ocp.tree.to_flat_dict(target)
    # Params first: the optimizer state only mirrors them.
    wanted = dict(sorted(wanted.items(), key=lambda item: item[0][0] != "params"))
    lines = _differences(stored, wanted, partial)
    if lines:
        more = [f"... and {len(lines) - 8} more"] if len(lines) > 8 else []
        shown = "\n  ".join(lines[:8] + more)
        raise ValueError(f"checkpoint {manager.directory / str(step)} does not fit the state "
                         f"asked for (a different model or optimizer config?):\n  {shown}\n"
                         f"Fix: {_FIX}.")


def _resolve_step(manager, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {manager.directory}; train first with "
                                f"`headwise train --run-dir ...`")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no step {step} in {manager.directory}; it has {steps}")
    return steps[-1] if step is None else step


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read back whole; the message names the step, the file or
    array, and what was wrong, in one line."""


def _damaged(manager, step: int, what: str) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"checkpoint {manager.directory / str(step)} cannot be read: {what}")


def _read(manager, step: int, what: str, read):
    """`read()`, any failure of orbax or TensorStore turned into one DamagedCheckpoint line."""
    try:
        return read()
    except Exception as error:  # whatever a missing, cut or garbled file makes the reader raise
        _quiet_abandoned_reads()
        raise _damaged(manager, step, f"{what}: {integrity_lib.first_line_of_cause(error)}"
                       ) from error


def _quiet_abandoned_reads() -> None:
    """A failed restore abandons orbax's other reads of that checkpoint. Later, from TensorStore's
    threads and the garbage collector, they raise into Python's unraisable-exception hook
    ("Exception ignored in <coroutine _read_array_index_and_device_put>", "Event loop is
    closed"): 3,000 lines of tracebacks after our one line, for one damaged checkpoint of the
    tiny model. From the first failed read on, those two are dropped; any other still reaches
    the hook."""
    if getattr(sys.unraisablehook, "quiets_orbax", False):
        return
    hook = sys.unraisablehook

    def quiet(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        leftover_read = code is not None and "orbax" in code.co_filename
        closed_loop = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                       and str(unraisable.exc_value) == "Event loop is closed")
        if not (leftover_read or closed_loop):
            hook(unraisable)

    quiet.quiets_orbax = True
    sys.unraisablehook = quiet


def _saved_integrity(manager, step: int) -> dict:
    """The checksums and fingerprint saved with `step`; empty for a checkpoint written before
    headwise saved them."""
    if not (manager.directory / str(step) / INTEGRITY).is_dir():
        return {}
    return _read(manager, step, INTEGRITY, lambda: manager.restore(step, args=ocp.args.Composite(
        **{INTEGRITY: ocp.args.JsonRestore()}))[INTEGRITY]) or {}


def _check_fingerprint(manager, step: int, saved: dict | None, wanted: dict | None) -> None:
    lines = integrity_lib.fingerprint_differences(saved or {}, wanted or {})
    if lines:
        raise ValueError(f"checkpoint {manager.directory / str(step)} was trained with another "
                         f"model or tokenizer: {'; '.join(lines)}. Fix: resume with the run's "
                         f"own config and data, or start a fresh --run-dir")


def _check_readable(manager, step: int) -> None:
    """Before reading a byte: no link out of the folder, and the state's metadata readable."""
    links = integrity_lib.escaping_links(manager.directory / str(step))
    if links:
        raise _damaged(manager, step, f"{links[0]} points outside the checkpoint; refused")
    items = _read(manager, step, "state/_METADATA", lambda: manager.item_metadata(step))
    if items.get("state") is None:
        raise _damaged(manager, step, "state/_METADATA is missing or unreadable")


def restore(manager: ocp.CheckpointManager, abstract_state: dict,
            step: int | None = None, *, fingerprint: dict | None = None) -> tuple[dict, dict]:
    """(state, config) of `step` (default newest), laid out as `abstract_state` says.

    `abstract_state` leaves are arrays or `jax.ShapeDtypeStruct`s; each restored array takes
    that leaf's sharding (any mesh, not necessarily the saving one), or one device if it has none.
    DamagedCheckpoint if it cannot be read whole (checksums included); ValueError if it does
    not fit the state, or `fingerprint` differs from the one it was saved with.
    """
    manager.wait_until_finished()
    step = _resolve_step(manager, step)
    target = jax.tree.map(_abstract, abstract_state)
    _check_readable(manager, step)
    saved = _saved_integrity(manager, step)
    _check_fingerprint(manager, step, saved.get("fingerprint"), fingerprint)
    _check_compatible(manager, step, target)
    restored = _read(manager, step, "state", lambda: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore())))
    garbled = integrity_lib.mismatches(restored["state"], saved.get("checksums") or {})
    if garbled:
        raise _damaged(manager, step, f"state/{garbled[0]}: its values differ from the checksum "
                       f"saved with them (garbled on disk)" + (
                           f", and {len(garbled) - 1} more arrays" if len(garbled) > 1 else ""))
    state, key = dict(restored["state"]), abstract_state["key"]
    if _is_key(key):
        state["key"] = jax.random.wrap_key_data(state["key"], dtype=key.dtype)
    return state, restored["config"]


def _move_aside(manager, steps: list[int]) -> None:
    """Damaged checkpoints go to RUN_DIR/damaged_checkpoints (kept to look at, out of the way
    of the steps the run will save again). Process 0 moves them, between two barriers."""
    multihost_utils.sync_global_devices("headwise: before moving damaged checkpoints")
    if jax.process_index() == 0:
        aside = pathlib.Path(manager.directory).parent / DAMAGED
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            (pathlib.Path(manager.directory) / str(step)).rename(target)
    multihost_utils.sync_global_devices("headwise: damaged checkpoints moved")
    manager.reload()


def restore_newest_readable(manager, abstract_state: dict, *, fingerprint: dict | None = None,
                            say=print) -> tuple[dict, dict, int] | None:
    """(state, config, step) of the newest checkpoint that reads back whole, or None if there
    are none. Each one that cannot be read is reported in a line and moved aside; if none can
    be read, RunFault, and nothing is moved."""
    manager.wait_until_finished()
    steps, damaged = sorted(manager.all_steps(), reverse=True), []
    for step in steps:
        try:
            state, config = restore(manager, abstract_state, step, fingerprint=fingerprint)
        except DamagedCheckpoint as error:
            rest = [s for s in steps if s < step]
            say(f"warning: {error}; " + (f"falling back to step {rest[0]}" if rest else
                                         "no older checkpoint"))
            damaged.append(step)
            continue
        if damaged:
            _move_aside(manager, damaged)
            say(f"moved the damaged checkpoint(s) of step(s) {damaged} to "
                f"{manager.directory.parent / DAMAGED}")
        return state, config, step
    if steps:
        raise RunFault(f"none of the {len(steps)} checkpoints in {manager.directory} can be read "
                       f"(steps {sorted(steps)}; see the warnings above); nothing was changed. "
                       f"Fix: restore them from a copy, or move them away to start afresh")
    return None


def _model_config(config: dict, where) -> ModelConfig:
    fields = config.get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: the stored run config has no `model` section; "
                         f"was it written by `headwise train`?")
    try:
        return ModelConfig(**fields)
    except TypeError as error:  # an unknown field, e.g. from another headwise version
        raise ValueError(f"{where}: stored model config does not fit ModelConfig: {error}"
                         ) from None


def load_model(run_dir) -> tuple[dict, ModelConfig]:
    """(params, ModelConfig) from a run's newest checkpoint, on one device; the rest unread."""
    directory = pathlib.Path(run_dir).absolute() / SUBDIR
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints at {directory}; train first with "
                                f"`headwise train --run-dir {run_dir}`")
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options, handler_registry=_registry()) as manager:
        step = _resolve_step(manager, None)
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        cfg = _model_config(config["config"], directory / str(step))
        shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
        target = {"params": jax.tree.map(_abstract, shapes)}
        _check_compatible(manager, step, target, partial=True)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args, partial_restore=True)))
    return restored["state"]["params"], cfg


def _stored_shapes(manager, step: int) -> dict:
    """The saved state's shapes and dtypes, from its metadata, each on one device."""
    _check_readable(manager, step)
    tree = manager.item_metadata(step)["state"].tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_single_device()),
                        tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def check_run(run_dir) -> list[tuple[str, str | None]]:
    """Every checkpoint of a run read back whole (checksums too): (its folder, what is wrong
    with it or None), oldest first, unfinished saves included. Nothing is written."""
    directory = pathlib.Path(run_dir).absolute() / SUBDIR
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints at {directory}; is {run_dir} a run directory?")
    results = [(p.name, "an unfinished save (a crash mid-save; the next run deletes it)")
               for p in sorted(directory.iterdir()) if ".orbax-checkpoint-tmp" in p.name]
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False,
                                           read_only=True)
    with ocp.CheckpointManager(directory, options=options, handler_registry=_registry()) as manager:
        for step in sorted(manager.all_steps()):
            try:
                restore(manager, _stored_shapes(manager, step), step)
                results.append((str(step), None))
            except DamagedCheckpoint as error:
                results.append((str(step), str(error).split(": ", 1)[1]))
    return results


def _task(run_dir) -> str | None:
    """The generated task a run trained on (its config.toml's data.task), if any."""
    try:
        return tomllib.loads((pathlib.Path(run_dir) / "config.toml").read_text())["data"]["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_tokenizer(run_dir):
    """The tokenizer a run was trained with (its tokenizer.json), to encode prompts and decode."""
    path = pathlib.Path(run_dir) / "tokenizer.json"
    if not path.is_file() and _task(run_dir) == numbers.TASK:
        raise ValueError(f"{run_dir} is a {numbers.TASK} run: it reads digits, not text. Use "
                         f"`headwise translate --run-dir {run_dir} --input 1234`, or "
                         f"`headwise attention --run-dir {run_dir} --input 1234` to see its "
                         f"cross-attention")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this run's data had no tokenizer to turn "
                                f"text into tokens and back")
    return tokenizer_from_json(path.read_text())
