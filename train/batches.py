"""Batches of token windows as pure functions of (seed, step), each process taking its own rows."""
from collections.abc import Iterator

import numpy as np


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, context_length: int,
              process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_BT, targets_BT) int32 for this process: its contiguous rows of the global batch for `step`.

    A pure function of its arguments, so resuming at a step is exact and every host can compute
    its own rows. `batch_size` is global; targets are the inputs shifted left by one token.
    """
    _check_batch_args(len(tokens), batch_size, context_length, process_index, process_count)
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    # every process draws the whole global batch, so their rows agree without talking to each other
    starts_B = np.random.default_rng([seed, step]).integers(0, len(tokens) - context_length, size=batch_size)
    rows = batch_size // process_count
    starts_b = starts_B[process_index * rows:(process_index + 1) * rows]
    window_BT = np.asarray(tokens[starts_b[:, None] + np.arange(context_length + 1)], np.int32)
    return window_BT[:, :-1], window_BT[:, 1:]


def _check_batch_args(n_tokens: int, batch_size: int, context_length: int,
                      process_index: int, process_count: int) -> None:
    for name, value in (("batch_size", batch_size), ("context_length", context_length),
                        ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be divisible by the process count {process_count}, "
                         f"so each process loads the same number of rows")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if n_tokens < context_length + 1:
        raise ValueError(f"{n_tokens:,} tokens cannot fill one window of context_length + 1 = "
                         f"{context_length + 1:,}; use more data or a shorter context")


def eval_batches(tokens: np.ndarray, *, seed: int, num_batches: int, batch_size: int, context_length: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same `num_batches` batches on every call, so successive evaluation losses are comparable."""
    for step in range(num_batches):
        yield get_batch(tokens, seed=seed, step=step, batch_size=batch_size, context_length=context_length,
                        process_index=process_index, process_count=process_count)
