"""A jax.profiler trace of chosen training steps, written into the run folder."""
import pathlib

import jax


def parse_steps(text: str) -> tuple[int, int]:
    """'START:STOP' -> (START, STOP): the steps START .. STOP - 1 are traced."""
    start, sep, stop = text.partition(":")
    try:
        steps = int(start), int(stop)
    except ValueError:
        steps = None
    if not sep or steps is None or not 0 <= steps[0] < steps[1]:
        raise ValueError(f"--profile expects START:STOP step numbers with 0 <= START < STOP "
                         f"(the steps START .. STOP-1 are traced), e.g. 10:15; got {text!r}")
    return steps


class StepProfiler:
    """Traces the steps [start, stop) of a loop into `folder`: an xplane.pb for TensorBoard's or
    XProf's profile tab and a perfetto_trace.json.gz for ui.perfetto.dev. Each traced step is
    marked with a StepTraceAnnotation, so those tools see where steps begin and end."""

    def __init__(self, steps: tuple[int, int] | None, folder: pathlib.Path):
        self.steps, self.folder, self.tracing, self.annotation = steps, folder, False, None

    def begin(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
            self.tracing = True
        if self.tracing:
            self.annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self.annotation.__enter__()

    def end(self, step: int, outputs) -> None:
        """After the step's work is dispatched: wait for it to finish (the trace should hold
        the computation, not only its launch), and stop after the last traced step."""
        if not self.tracing:
            return
        jax.block_until_ready(outputs)
        self.annotation.__exit__(None, None, None)
        if step + 1 >= self.steps[1]:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the loop ends before STOP)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
