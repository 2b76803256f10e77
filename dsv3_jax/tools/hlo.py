"""Per-device work of a compiled XLA program read from its HLO text: collectives, matmul FLOPs and HBM traffic, each
multiplied by how often it runs.

XLA's own `cost_analysis()` counts the body of a `while` loop once, so a 61-layer `lax.scan` looks like one layer;
here every instruction is weighted by the product of the `known_trip_count`s of the loops around it. Matmul FLOPs
are 2 * |output| * |contracted dims| of every `dot`; HBM traffic is operand + result bytes of every unfused
instruction (fusions count as one instruction), XLA's "bytes accessed" convention, with one correction that matters
inside loops: a slice (`dynamic-slice`, `slice`, `gather`) reads only what it returns and an in-place update
(`dynamic-update-slice`, `scatter`) writes only its update, also when either sits inside a fusion. Without it a
scanned layer that slices its weights out of the stacked (L, ...) array would be charged the whole stack per layer.
Collectives count at the dtype that would travel on an accelerator (`wire_fraction`: XLA:CPU widens bf16 ones to
f32) and split into bytes inside and across scale-up domains (`inter_node_fraction`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}


_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")


_INSTR = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = ")


_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")


_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((\[[^\]]*\](?:T\([^)]*\))?)\))? "
                          r"\{([^}]*)\}")


_SLICES = {"dynamic-slice", "slice", "gather"}


_UPDATE_OPERAND = {"dynamic-update-slice": 1, "scatter": 2}  # in-place updates: which operand is the update


_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # result shape text, e.g. "f32[8,64]{1,0}" or a tuple "(f32[2], s32[])"
    op: str
    operands: list[str]
    attrs: str
    root: bool = False
    param_index: int = -1  # the `parameter(i)` number, for parameters


def _closing(s: str, i: int) -> int:
    """Index just past the bracket that closes the one at s[i]."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    close = pairs[s[i]]
    for j in range(i, len(s)):
        if s[j] == s[i]:
            depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    p = rest.find("(")
    op, close = rest[:p], _closing(rest, p)
    operands = re.findall(r"%([\w.\-]+)", rest[p:close])
    index = int(rest[p + 1:close - 1]) if op == "parameter" else -1
    return Instr(m.group(2), shape, op, operands, rest[close:], bool(m.group(1)), index)


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation name: instructions} and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if not line.startswith(" "):
            h = _HEADER.match(line)
            if h:
                current = comps.setdefault(h.group(1), [])
                entry = h.group(1) if line.startswith("ENTRY") else entry
            continue
        ins = parse_instr(line) if current is not None else None
        if ins is not None:
            current.append(ins)
    return comps, entry


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> float:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in arrays(shape))


def instruction_traffic(ins: Instr, shapes: dict[str, str], comps: dict[str, list[Instr]]) -> float:
    """HBM bytes one execution of a top-level instruction moves: result + operands, except that slices read only
    what they return and in-place updates move only the update (see the module docstring)."""
    if ins.op in _SLICES:
        return 2 * nbytes(ins.shape)
    if ins.op in _UPDATE_OPERAND:
        return 2 * nbytes(shapes.get(ins.operands[_UPDATE_OPERAND[ins.op]], ""))
    reads = [nbytes(shapes.get(o, "")) for o in ins.operands]
    write = nbytes(ins.shape)
    fused = re.search(r"\bcalls=%([\w.\-]+)", ins.attrs) if ins.op == "fusion" else None
    body = comps.get(fused.group(1), []) if fused else []
    params = {i.name: i.param_index for i in body if i.op == "parameter"}
    users: dict[str, list[tuple[Instr, int]]] = {}
    for i in body:
        for pos, o in enumerate(i.operands):
            users.setdefault(o, []).append((i, pos))
    for name, k in params.items():
        used = users.get(name, [])
        if 0 <= k < len(reads) and used and all(u.op in _SLICES and pos == 0 for u, pos in used):
            reads[k] = sum(nbytes(u.shape) for u, _ in used)
    root = next((i for i in body if i.root), None)
    if root is not None and root.op in _UPDATE_OPERAND and root.operands[0] in params:
        k = params[root.operands[0]]
        update = nbytes({i.name: i.shape for i in body}.get(root.operands[_UPDATE_OPERAND[root.op]], ""))
        if 0 <= k < len(reads) and users.get(root.operands[0]) == [(root, 0)]:
            reads[k], write = 0.0, update
    return write + sum(reads)


def multipliers(comps: dict[str, list[Instr]], entry: str) -> tuple[dict[str, int], set[str]]:
    """How many times each computation runs per call of the entry, and the set of fused/reducer computations."""
    mult, inner = {entry: 1}, set()
    order = [entry]
    for name in order:  # breadth first; a computation called from several places sums its callers
        for ins in comps.get(name, []):
            called = _CALLED.findall(ins.attrs)
            branches = _BRANCHES.search(ins.attrs)
            if branches:
                called += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
            trip = _TRIP.search(ins.attrs)
            for kind, target in called:
                times = mult[name] * (int(trip.group(1)) if trip and kind in ("body", "condition") else 1)
                if kind in ("calls", "to_apply") and ins.op != "call":
                    inner.add(target)
                if target not in mult:
                    order.append(target)
                mult[target] = mult.get(target, 0) + times
    return mult, inner


def replica_groups(attrs: str, n_devices: int) -> np.ndarray | None:
    """(groups, group size) device ids of a collective, from any of XLA's three printed forms."""
    m = _MESH_GROUPS.search(attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        sizes = [int(s) for _, s in axes]
        ids = _iota(m.group(2), math.prod(sizes)) if m.group(2) else np.arange(math.prod(sizes))
        ids = ids.reshape(sizes)
        names = [a for a, _ in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(3))]
        rest = [i for i in range(len(names)) if i not in grouped]
        return ids.transpose(rest + grouped).reshape(-1, math.prod(sizes[i] for i in grouped))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[^\]]*\](?:T\([^)]*\))?)", attrs)
    if m:
        return _iota(m.group(3), int(m.group(1)) * int(m.group(2))).reshape(int(m.group(1)), int(m.group(2)))
    m = re.search(r"replica_groups=\{(\{[^=]*?\})\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([^{}]*)\}", m.group(1))]
        if groups and len({len(g) for g in groups}) == 1:
            return np.asarray(groups)
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:
        pairs = [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", m.group(0))]
        return np.asarray([p for p in pairs if p[0] != p[1]] or [[0, 0]])
    return np.arange(n_devices).reshape(1, -1)


def _iota(spec: str, n: int) -> np.ndarray:
    """XLA's iota device list `[a,b,c]T(perm)` (reshape 0..n-1, transpose) flattened."""
    m = re.match(r"\[([\d,]*)\](?:T\(([\d,]*)\))?", spec.strip())
    dims = [int(d) for d in m.group(1).split(",")]
    ids = np.arange(n).reshape(dims)
    if m.group(2):
        ids = ids.transpose([int(p) for p in m.group(2).split(",")])
    return ids.reshape(-1)


def link_bytes(kind: str, size: float, group: int) -> float:
    """Bytes one device sends for a collective whose result (per device) is `size` bytes, over a ring of `group`."""
    if group <= 1:
        return 0.0
    frac = (group - 1) / group
    return {"all-gather": size * frac, "reduce-scatter": size * (group - 1), "all-reduce": 2 * size * frac,
            "collective-permute": size}.get(kind, size * frac)


def _collective_size(ins: Instr, kind: str) -> float:
    """Result bytes of a collective; for an async `-start` the tuple holds (inputs..., outputs...)."""
    if not ins.op.endswith("-start") or kind == "all-reduce":
        return nbytes(ins.shape)
    parts = [dt + "[" + ",".join(map(str, d)) + "]" for dt, d in arrays(ins.shape) if d]
    return sum(nbytes(p) for p in parts[len(parts) // 2:])


def group_axes(groups: np.ndarray, device_ids: np.ndarray | None, names: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes a collective's groups span: those along which the first group's device coordinates vary
    (`device_ids`: the mesh's device id grid, axis order `names`)."""
    if device_ids is None or groups.shape[1] <= 1:
        return ()
    where = {int(d): np.unravel_index(i, device_ids.shape) for i, d in enumerate(device_ids.reshape(-1))}
    coords = np.asarray([where[int(d)] for d in groups[0] if int(d) in where])
    return tuple(n for k, n in enumerate(names) if len(coords) and len(set(coords[:, k])) > 1)


def summarize(ops: list[dict]) -> dict[str, dict]:
    """Per-kind totals (count, result bytes, bytes sent, bytes sent across nodes) of `collective_ops` entries."""
    keys = ("count", "bytes", "link_bytes", "inter_node_link_bytes")
    out: dict[str, dict] = {}
    for op in ops:
        c = out.setdefault(op["kind"], dict.fromkeys(keys, 0))
        c["count"] += op["times"]
        for k in keys[1:]:
            c[k] += op[k]
    return out


def by_axes(ops: list[dict]) -> dict[str, dict]:
    """Bytes sent per step grouped by the mesh axes the collective spans ("fsdp+expert": one group over both)."""
    out: dict[str, dict] = {}
    for op in ops:
        c = out.setdefault("+".join(op["axes"]) or "-", {"link_bytes": 0.0, "inter_node_link_bytes": 0.0})
        c["link_bytes"] += op["link_bytes"]
        c["inter_node_link_bytes"] += op["inter_node_link_bytes"]
    return out


def inter_node_fraction(kind: str, groups: np.ndarray, node: int | None) -> float:
    """The part of a collective's bytes that crosses scale-up domains of `node` devices: an all-to-all sends each
    peer its own share, so only the shares of peers in other domains cross; a ring collective (gather, reduce)
    whose group spans domains runs at the slower link's pace, so all of it counts."""
    if node is None or groups.shape[1] <= 1:
        return 0.0
    domain = groups // node
    if "all-to-all" not in kind:
        return float((domain != domain[:, :1]).any())
    off = (domain[:, :, None] != domain[:, None, :]).sum(-1)  # (groups, members): peers in other domains
    return float(off.mean() / (groups.shape[1] - 1))


def _root_convert_source(name: str, instrs: dict[str, Instr], comps: dict[str, list[Instr]]) -> str | None:
    """The dtype a value was converted from, when it is a `convert` (or a fusion whose root is one)."""
    ins = instrs.get(name)
    if ins is None:
        return None
    if ins.op == "fusion":
        fused = re.search(r"\bcalls=%([\w.\-]+)", ins.attrs)
        body = comps.get(fused.group(1), []) if fused else []
        ins, instrs = next((i for i in body if i.root), None), {i.name: i for i in body}
    while ins is not None and ins.op in ("bitcast", "copy", "reshape", "transpose") and ins.operands:
        ins = instrs.get(ins.operands[0])  # layout-only ops between the convert and the collective
    if ins is None or ins.op != "convert" or ins.operands[0] not in instrs:
        return None
    src = arrays(instrs[ins.operands[0]].shape)
    return src[0][0] if src else None


def wire_fraction(ins: Instr, instrs: dict[str, Instr], comps: dict[str, list[Instr]]) -> float:
    """XLA:CPU runs bf16 (and fp8) collectives in f32, converting around them; on an accelerator they move the
    narrow type. The fraction of the compiled bytes that would travel: narrow / wide when every operand is a
    convert from a narrower type, else 1."""
    wide = [_DTYPE_BYTES.get(dt, 4) for dt, _ in arrays(ins.shape)]
    narrow = [_root_convert_source(o, instrs, comps) for o in ins.operands]
    if not wide or not narrow or None in narrow:
        return 1.0
    return min(1.0, max(_DTYPE_BYTES.get(dt, 4) for dt in narrow) / max(wide))


def analyze(text: str, n_devices: int, node: int | None = None, device_ids: np.ndarray | None = None,
            axis_names: tuple[str, ...] = ()) -> dict:
    """Per-device counts for one execution of the compiled program in `text` (its `as_text()`).

    `node`: devices per scale-up domain; a collective whose group spans two domains is counted as inter-node.
    `device_ids`, `axis_names`: the mesh, to name the axes each collective spans.
    """
    comps, entry = parse(text)
    mult, inner = multipliers(comps, entry)
    flops = traffic = 0.0
    ops = []
    for cname, instrs in comps.items():
        times = mult.get(cname, 0)
        if not times:
            continue
        shapes = {i.name: i.shape for i in instrs}
        by_name = {i.name: i for i in instrs}
        for ins in instrs:
            if ins.op == "dot":
                lhs = arrays(shapes.get(ins.operands[0], ""))
                dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
                if lhs and dims:
                    k = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
                    flops += times * 2 * math.prod(arrays(ins.shape)[0][1]) * k
            if cname not in inner and ins.op not in _NO_TRAFFIC and not ins.op.endswith("-done"):
                traffic += times * instruction_traffic(ins, shapes, comps)
            kind = ins.op.removesuffix("-start")
            if kind not in COLLECTIVES or ins.op.endswith("-done"):
                continue
            groups = replica_groups(ins.attrs, n_devices)
            size = _collective_size(ins, kind) * wire_fraction(ins, by_name, comps)
            sent = link_bytes(kind, size, groups.shape[1])
            crosses = inter_node_fraction(kind, groups, node)
            where = re.search(r'op_name="([^"]*)"', ins.attrs)
            ops.append({"kind": kind, "shape": re.sub(r"\{[^}]*\}", "", ins.shape), "group": int(groups.shape[1]),
                        "axes": group_axes(groups, device_ids, axis_names), "times": times, "bytes": times * size,
                        "link_bytes": times * sent, "inter_node_link_bytes": times * sent * crosses,
                        "op_name": where.group(1) if where else ""})
    ops.sort(key=lambda d: -d["bytes"])
    loops = [int(t) for t in _TRIP.findall(text)]
    unknown = sum(1 for instrs in comps.values() for i in instrs if i.op == "while" and not _TRIP.search(i.attrs))
    return {"loops_of_unknown_length": unknown, "dot_flops": flops, "hbm_traffic": traffic,
            "collectives": summarize(ops), "largest_collectives": ops[:8],
            "collective_ops": ops, "loop_trip_counts": loops}
