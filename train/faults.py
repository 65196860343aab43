"""What a run does when something goes wrong: non-finite steps, files written whole, one-line faults."""
import math
import os
import pathlib
import sys
import tempfile


class RunFault(RuntimeError):
    """A run that had to stop, in one line naming what happened and the fix (the CLI prints it
    and exits 1, without a traceback)."""


def finite_or_none(value):
    """JSON has no NaN or infinity (`jq` and most readers reject them): those become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_whole(path: pathlib.Path, text: str) -> None:
    """Write `text` to a sibling, then rename it over `path`: a crash at any moment leaves the
    old file or the new one, never half of one."""
    path = pathlib.Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def writable_folder(path: pathlib.Path, flag: str) -> pathlib.Path:
    """`path`, made (parents too) and written to once, so a folder we cannot use fails at
    start-up, in one line, before anything compiles."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ValueError(f"{flag} {path} is not a folder we can write to "
                         f"({error.strerror or error}); pick another, or fix its permissions"
                         ) from None
    return path


class NonFiniteSteps:
    """Counts the steps the train step skipped because their loss, gradient norm or new params
    were not finite: in a row (the run stops at `limit`), since the last metrics row, and in
    all. Each step's flag is read a step late, so the host never waits for the step it just
    dispatched; `settle` reads it at once where the loop waits anyway (a log row, a save)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.since_row, self.total = limit, 0, 0, 0
        self.pending, self.step, self.streaks = None, 0, []  # streaks: steps that began one

    def add(self, step: int, flag) -> None:
        """Note `step`'s skip flag (a device scalar, the same on every process); read the
        previous one's."""
        self.settle()
        self.pending = (step, flag)

    def settle(self) -> None:
        if self.pending is None:
            return
        (self.step, flag), self.pending = self.pending, None
        skipped = bool(flag)
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.since_row += int(skipped)
        self.total += int(skipped)
        if skipped and self.in_a_row == 1:
            self.streaks.append(self.step)

    def take_streaks(self) -> list[int]:
        """The steps that began a run of skipped steps since the last call (worth a warning)."""
        steps, self.streaks = self.streaks, []
        return steps

    def take_since_row(self) -> int:
        self.settle()
        count, self.since_row = self.since_row, 0
        return count

    def check(self, newest_checkpoint) -> None:
        """RunFault once `limit` steps in a row were skipped; `newest_checkpoint()` names the
        step it leaves the run at."""
        if self.in_a_row < self.limit:
            return
        newest_checkpoint = newest_checkpoint()
        kept = (f"the newest checkpoint (step {newest_checkpoint}) is the last good state"
                if newest_checkpoint is not None else "no checkpoint was written")
        raise RunFault(f"step {self.step}: loss or gradient norm non-finite for {self.in_a_row} "
                       f"steps in a row (train.max_bad_steps={self.limit}); their updates were "
                       f"skipped and not saved: {kept}. Fix: lower optim.lr, raise "
                       f"optim.warmup_steps, or check the data")


def exit_for_lost_peer(error: Exception, process: int) -> None:
    """A collective failed in a multi-process run: another process died or lost contact. Say
    so in one line and leave at once (exit 1): JAX's own shutdown would wait for the dead
    peer at a barrier, then abort with a C++ stack trace."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"headwise train: stopped: process {process} lost contact with another process of "
          f"the run ({first[:300]}). Fix: start every process again with the same command; they "
          f"resume from the newest checkpoint they all finished", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
