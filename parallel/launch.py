"""Start-up before jax touches a device: simulated CPU devices, and JAX's multi-process runtime."""
import os

import jax


def simulate_cpu_devices(n: int) -> None:
    """N CPU devices in this process, so any mesh can be tried on a laptop."""
    if n < 1:
        raise ValueError(f"--devices must be at least 1, got {n}")
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
