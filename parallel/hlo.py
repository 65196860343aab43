"""What a compiled program's collectives move: operand bytes per device, read from its HLO text."""
import collections
import math
import re


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*?)\)(.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEE = re.compile(r"\b(?:body|calls|to_apply)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape, array or tuple: 'f32[64,192]{1,0}' -> 49152."""
    return sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def _computations(hlo_text: str) -> tuple[dict, str]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    return comps, entry


def _kind(op: str) -> str | None:
    """'all-gather-start' -> 'all-gather'; None for anything not a collective (or a *-done)."""
    base = op[:-len("-start")] if op.endswith("-start") else op
    return base if base in COLLECTIVES else None


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Operand bytes per device that each kind of collective moves in one run of the program.
    A collective inside a while loop counts once per iteration (XLA's known_trip_count), so a
    scan over L layers counts its per-layer all-gathers L times."""
    comps, entry = _computations(hlo_text)
    shapes = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
    memo = {}

    def total(name: str) -> collections.Counter:
        if name in memo:
            return memo[name]
        memo[name] = counts = collections.Counter()
        for line in comps.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            kind = _kind(m.group(3))
            if kind:
                operands = re.findall(r"%([\w.-]+)", m.group(4))
                counts[kind] += sum(shape_bytes(shapes.get(o, "")) for o in operands)
            trips = int(_TRIP.search(line).group(1)) if _TRIP.search(line) else 1
            for callee in _CALLEE.findall(m.group(5)):
                for k, v in total(callee).items():
                    counts[k] += trips * v
            branches = _BRANCHES.search(m.group(5))
            if branches:  # a conditional runs one branch: count the largest
                sub = [total(b.strip().lstrip("%")) for b in branches.group(1).split(",")]
                for k in COLLECTIVES:
                    counts[k] += max(s[k] for s in sub)
        return counts

    return {k: int(total(entry)[k]) for k in COLLECTIVES}


def collective_ops(hlo_text: str) -> list[tuple[str, int, str]]:
    """Each collective instruction of the program once (loops not unrolled): (kind, operand
    bytes, its metadata op_name), for reading where XLA put them."""
    comps, _ = _computations(hlo_text)
    shapes, found = {}, []
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m and _kind(m.group(3)):
                operands = re.findall(r"%([\w.-]+)", m.group(4))
                where = re.search(r'op_name="([^"]*)"', line)
                found.append((_kind(m.group(3)), sum(shape_bytes(shapes.get(o, ""))
                                                     for o in operands),
                              where.group(1) if where else ""))
    return found
