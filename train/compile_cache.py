"""JAX's persistent compilation cache: a second start of the same config skips XLA's compile."""
import os
import pathlib

import jax

# The variable that moves the cache, or turns it off with "off" (tests set it so).
ENV = "HEADWISE_COMPILE_CACHE"


def default_folder() -> pathlib.Path:
    """jax-compile in headwise's cache folder (the token cache's): $HEADWISE_CACHE, else
    ~/.cache/headwise."""
    root = os.environ.get("HEADWISE_CACHE") or "~/.cache/headwise"
    return pathlib.Path(root).expanduser() / "jax-compile"


def cache_folder(enabled: bool = True) -> pathlib.Path | None:
    """Where compiled programs go: $HEADWISE_COMPILE_CACHE, else the user's cache folder; None
    when turned off (the flag, or the variable set to "off")."""
    value = os.environ.get(ENV, "")
    if not enabled or value.lower() == "off":
        return None
    return pathlib.Path(value) if value else default_folder()


def unsafe_here() -> str | None:
    """Why the cache must stay off on these devices, or None. XLA:CPU programs whose devices
    exchange data (several CPU devices: simulated, or processes over gloo), loaded from the
    cache, sometimes deadlock: the devices enter their collectives in different orders, and
    XLA aborts the process after its collective timeout (a fresh compile never did)."""
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        return (f"compilation cache off: XLA:CPU programs across {jax.device_count()} CPU "
                f"devices, loaded from it, can deadlock in their collectives")
    return None


def enable(folder: pathlib.Path) -> None:
    """Cache every program compiled from now on in `folder`: also the quick ones (JAX's default
    skips programs that compile in under a second, which on a GPU is most of a small run)."""
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
