"""Start-up before jax touches a device: the host's allocator, simulated CPU devices, and JAX's
multi-process runtime."""
import ctypes
import os

import jax


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the system. XLA:CPU
    allocates a program's temporaries at every call (110 MB for the default model's gradient);
    above 32 MB glibc maps such a block afresh and unmaps it when freed, so every step
    page-faulted all of it in again: 27k faults and about a fifth of the step's CPU time in
    the kernel. One arena, no mmap, no trimming: 1k faults, and the gradient takes 0.84x the
    time (docs/benchmarks.md). Skipped where the user chose (MALLOC_* set, or a preloaded
    allocator) or glibc is absent. Returns whether it applied."""
    if os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


# XLA:CPU's simulated devices are threads of one process. A collective aborts the process when
# one of them has not joined it in time (40 s to terminate; the collectives have a wait of
# their own), and a loaded machine with fewer cores than devices can starve a thread that long
# (seen in the test suite, and with --devices 2 on 2 busy cores). XLA reads XLA_FLAGS when its
# CPU client starts.
COLLECTIVE_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds",
                            "--xla_cpu_collective_timeout_seconds")


def simulate_cpu_devices(n: int) -> None:
    """N CPU devices in this process, so any mesh can be tried on a laptop; their collectives
    wait 300 s for a late device, unless XLA_FLAGS already says how long."""
    if n < 1:
        raise ValueError(f"--devices must be at least 1, got {n}")
    flags = os.environ.get("XLA_FLAGS", "")
    flags += "".join(f" {flag}=300" for flag in COLLECTIVE_TIMEOUT_FLAGS if flag not in flags)
    os.environ["XLA_FLAGS"] = flags.strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is not None and not value.strip().isdigit():
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return None if value is None else int(value)


def start_distributed(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, *, auto: bool = False) -> bool:
    """`jax.distributed.initialize` from flags, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, else (with `auto`) JAX's own detection of SLURM, Open MPI, TPU pods ...
    Returns whether a multi-process runtime was started. CPU processes talk through gloo."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None and not auto:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return False
    if (num_processes is None) != (process_id is None) or (
            coordinator is not None and num_processes is None):
        raise ValueError("give --num-processes N and --process-id I together (or JAX_NUM_PROCESSES "
                         "and JAX_PROCESS_ID), and both with --coordinator HOST:PORT")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
