"""A jax.profiler trace of chosen training steps, written into the run folder, and where its
time went."""
import collections
import gzip
import json
import pathlib
import re

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
        self.traced = False

    def begin(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
            self.tracing = self.traced = True
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

    def keep_program(self, compiled) -> None:
        """The traced step's compiled program as text, beside the trace (PROGRAM): what each
        op named in the trace is."""
        if jax.process_index() == 0:
            (self.folder / PROGRAM).write_text(compiled.as_text())


PROGRAM = "train_step.hlo.txt"


# What an op is, from the words in its name (XLA's HLO names on CPU, kernel names on a GPU);
# the first kind that matches wins, so cuDNN's attention kernels are not counted as matmuls.
OP_KINDS = (("attention", ("cudnn", "sdpa", "flash", "attention")),
            ("collectives", ("all-reduce", "all_reduce", "all-gather", "all_gather", "nccl",
                             "reduce-scatter", "reduce_scatter", "all-to-all", "collective")),
            ("matmuls", ("gemm", "nvjet", "cublas", "cutlass", "xmma", "dot", "matmul", "convolution")),
            ("copies and transposes", ("memcpy", "memset", "copy", "transpose")))


def op_kind(name: str, kinds: dict | None = None) -> str:
    """The kind of op `name`: from the compiled program (`hlo_kinds`) if it is there, else
    from the words in its name."""
    if kinds and name in kinds:
        return kinds[name]
    lower = name.lower()
    return next((kind for kind, words in OP_KINDS if any(w in lower for w in words)), "other ops")


_MOVES = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice",
          "pad", "reverse", "gather"}
_FREE = {"parameter", "bitcast", "reshape", "broadcast", "constant", "tuple", "get-tuple-element"}


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Each instruction of a compiled program's text (`Compiled.as_text()`), by kind: a fusion
    is a matmul if it holds a dot, a copy if it only moves data. On the CPU the op names in a
    trace do not say it: a YNNPACK matmul is `ynn_fusion.59`."""
    bodies, instructions, body = {}, {}, None
    for line in hlo_text.splitlines():
        if header := re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{$", line):
            body = bodies.setdefault(header[1], set())
        elif (op := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)) and body is not None:
            rest = op[2]
            if rest.startswith("("):  # a tuple's type: skip to its closing parenthesis
                depth = 0
                for i, c in enumerate(rest):
                    depth += (c == "(") - (c == ")")
                    if depth == 0:
                        rest = rest[i + 1:]
                        break
            opcode = re.match(r"\s*(?:\S+ )?([a-z][\w\-]*)\(", rest)
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if opcode:
                body.add(opcode[1])
                instructions[op[1]] = (opcode[1], called[1] if called else None)

    def kind(opcode: str, held: set) -> str:
        if opcode in ("dot", "convolution") or held & {"dot", "convolution"}:
            return "matmuls"
        if any(w in opcode for w in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                     "collective-permute")):
            return "collectives"
        moved = held - _FREE if opcode == "fusion" else {opcode}
        return "copies and transposes" if moved and moved <= _MOVES else "other ops"

    return {name: kind(opcode, bodies.get(called, set()))
            for name, (opcode, called) in instructions.items()}


def op_events(events: list) -> list[tuple[str, float]]:
    """(name, µs) of every op the program ran: the events on a GPU's or TPU's streams, or on
    CPU (no device streams) those on XLA's own threads named as HLO names its instructions.
    Only leaves count: an op that holds others on its thread (a while loop) is the
    sum of them; kernels that merely overlap (a GPU launches the next before one ends) count
    whole."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items() if "/device:" in name}
    if device:
        is_op = lambda e: e["pid"] in device
    else:  # HLO instruction names (dot.3, loop_fusion.1), not the runtime's (Rendezvous, Wait: ..)
        is_op = lambda e: (threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
                           and re.fullmatch(r"[a-z][a-z0-9_.\-]*", e["name"]))
    lanes = {}
    for e in events:
        if e.get("ph") == "X" and is_op(e):
            lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    leaves = []
    for lane in lanes.values():
        lane.sort(key=lambda e: (e["ts"], -e["dur"]))
        for e, after in zip(lane, lane[1:] + [None]):
            if after is None or after["ts"] + after["dur"] > e["ts"] + e["dur"]:  # holds none
                leaves.append((e["name"], e["dur"]))
    return leaves


def time_by_op(trace_gz: pathlib.Path, steps: int | None = None, top: int = 8,
               hlo_text: str | None = None) -> str:
    """A Perfetto trace's op time per step, by kind and by op: where a step's time goes.
    `steps`: how many steps the trace holds (default: its "train" step annotations);
    `hlo_text`: the compiled step's text, which says what each op of a CPU trace is."""
    with gzip.open(trace_gz) as f:
        events = json.load(f)["traceEvents"]
    steps = steps or sum(e.get("ph") == "X" and e.get("name") == "train" for e in events) or 1
    leaves, kinds = op_events(events), hlo_kinds(hlo_text) if hlo_text else None
    by_kind, by_name = collections.Counter(), collections.Counter()
    for name, us in leaves:
        by_kind[op_kind(name, kinds)] += us / 1e3 / steps
        by_name[name] += us / 1e3 / steps
    total = sum(by_kind.values()) or float("nan")
    lines = [f"op time per step {total:.1f} ms ({len(leaves) / steps:,.0f} ops, {steps} steps):"]
    lines += [f"  {ms:8.2f} ms {ms / total:6.1%}  {kind}" for kind, ms in by_kind.most_common()]
    lines += ["top ops:"] + [f"  {ms:8.2f} ms  {name[:90]} ({op_kind(name, kinds)})"
                             for name, ms in by_name.most_common(top)]
    return "\n".join(lines)


def newest_trace(folder: pathlib.Path) -> pathlib.Path | None:
    """The last trace written under a profile folder (a resumed run adds one per start)."""
    return max(folder.glob("plugins/profile/*/perfetto_trace.json.gz"), default=None,
               key=lambda path: path.stat().st_mtime)
