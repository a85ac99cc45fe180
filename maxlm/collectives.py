"""Which collectives of a compiled program cross TPU slices (DCN) and which stay in one (ICI).

Compiled for several slices, XLA's TPU compiler emits one program per slice: its collectives
(`all-gather`, ... with `replica_groups` of partition ids) run inside the slice, and what crosses
slices becomes `send`/`recv` pairs to the multislice ("megascale") runtime, tagged with the
transfer type and the devices that take part. Both are read from `compiled.as_text()`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from maxlm.config import MESH_AXES
from maxlm.mesh import group_by_slice, slice_index

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>\S+) = (?P<shape>.*?) (?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
)
_SEND = re.compile(r"^\s*(?:ROOT )?%(?P<name>\S+) = (?P<shape>.*?) send\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLEES = re.compile(
    r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)|branch_computations=\{([^}]*)\}"
)
_GROUPS = re.compile(
    r"(?:replica_groups|source_target_pairs)=(\{[{}\d,]*\}|\[\d+,\d+\]<=\[[\d,]+\](?:T\([\d,]+\))?)"
)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective as compiled. `groups` name who exchanges data: partition ids of the program
    for an HLO collective, device ids for a transfer between slices (`dcn`); () is everyone."""

    kind: str
    name: str
    groups: tuple[tuple[int, ...], ...]
    bytes: int  # the largest array of its result; for a DCN transfer, what one chip sends
    dcn: bool
    in_loop: bool  # inside a while loop's body (scanned layers, micro-batches): runs repeatedly


def replica_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """HLO's `replica_groups` / `source_target_pairs` value: explicit `{{0,1},{2,3}}` or the
    iota form `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)` (ids = iota(dims) transposed, reshaped)."""
    iota = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota is None:
        return tuple(
            tuple(int(i) for i in group.split(",") if i)
            for group in re.findall(r"\{([\d,]*)\}", text[1:-1])
        )
    groups, size, dims, perm = iota.groups()
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if perm:
        ids = ids.transpose([int(p) for p in perm.split(",")])
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(int(groups), int(size)))


def megascale_groups(target: str, slices: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """The device-id groups of a transfer between slices: libtpu writes them out
    (`{{100000,200000},...}`) or as `"{1,2}x{0:3}"`: slices 1 and 2 (numbered from 1), each
    slice's devices 0 to 3 in id order, the k-th device of each slice in group k."""
    compact = re.fullmatch(r'"\{([\d,]+)\}x\{(\d+):(\d+)\}"', target)
    if compact is None:
        return replica_groups(target)
    numbers = [int(n) for n in compact.group(1).split(",")]
    first, last = int(compact.group(2)), int(compact.group(3))
    return tuple(tuple(slices[n - 1][k] for n in numbers) for k in range(first, last + 1))


def _largest_array(shape: str) -> int:
    arrays = re.findall(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]", shape)
    sizes = [
        _BYTES.get(t, 1) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays
    ]
    return max(sizes, default=0)


def _loop_computations(hlo: str) -> set[str]:
    """Computations that run inside a while loop's body, directly or through calls."""
    calls: dict[str, list[str]] = {}
    bodies: list[str] = []
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        for callees in _CALLEES.findall(line):
            calls.setdefault(computation, []).extend(re.findall(r"%([\w.\-]+)", "".join(callees)))
        bodies += re.findall(r"body=%([\w.\-]+)", line)
    inside, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name not in inside:
            inside.add(name)
            todo += calls.get(name, [])
    return inside


def parse(hlo: str, slices: Sequence[Sequence[int]] = ()) -> list[Collective]:
    """The collectives of a compiled HLO module, each once (the async pieces of one share its
    channel; a transfer's send and recv share its rendezvous key). `slices`: each slice's device
    ids in id order, to read libtpu's compact targets."""
    in_loop = _loop_computations(hlo)
    found: dict[tuple[str, str], Collective] = {}
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        elif (op := _OP.match(line)) is not None:
            groups = _GROUPS.search(line)
            channel = re.search(r"channel_id=(\d+)", line)
            key = (op["kind"], channel.group(1) if channel else op["name"])
            found.setdefault(
                key,
                Collective(
                    op["kind"], op["name"], replica_groups(groups.group(1)) if groups else (),
                    _largest_array(op["shape"]), dcn=False, in_loop=computation in in_loop,
                ),
            )  # fmt: skip
        elif (send := _SEND.match(line)) is not None and "_xla_megascale_transfer_type" in line:
            kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
            target = re.search(r"_xla_megascale_target=(\"[^\"]*\"|\{[{}\d,]*\})", line)
            rendezvous = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', line)
            if kind is None or target is None:
                raise ValueError(f"a transfer between slices without type or target: {line}")
            name = rendezvous.group(1) if rendezvous else send["name"]
            found.setdefault(
                ("dcn", name),
                Collective(
                    kind.group(1).lower().replace("_", "-"), name,
                    megascale_groups(target.group(1), slices), _largest_array(send["shape"]),
                    dcn=True, in_loop=computation in in_loop,
                ),
            )  # fmt: skip
    return list(found.values())


@dataclasses.dataclass(frozen=True)
class Traffic:
    """The collectives of one kind that cross slices along the same mesh axes."""

    kind: str
    axes: tuple[str, ...]  # mesh axes whose slice part differs within a group
    count: int  # outside loops: once per step
    bytes: int  # what one chip sends, summed over them
    loop_count: int  # in loop bodies: once per iteration (scanned layer, micro-batch)
    loop_bytes: int  # what one chip sends per iteration

    @property
    def expected(self) -> bool:
        """The data-parallel gradient all-reduce: the one collective meant to cross slices."""
        return self.kind == "all-reduce" and self.axes == ("data",)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Collectives of a compiled program: crossing slices, by kind and axes; within a slice."""

    crossing: list[Traffic]
    within: dict[str, int]  # kind -> number of collectives that stay inside one slice

    @property
    def unexpected(self) -> list[Traffic]:
        return [traffic for traffic in self.crossing if not traffic.expected]


def _crossed_axes(
    groups: list[list[jax.Device]], mesh: Mesh, dcn: Mapping[str, int]
) -> tuple[str, ...]:
    """The mesh axes along which a group's members sit in different slices: those whose slice
    (outer) part of the coordinate differs, in the hybrid layout of `maxlm.mesh`."""
    position = {device.id: index for index, device in enumerate(mesh.devices.flat)}
    ici = np.array([mesh.shape[axis] // dcn[axis] for axis in MESH_AXES])
    varies = np.zeros(len(MESH_AXES), bool)
    for group in groups:
        coords = np.array([np.unravel_index(position[d.id], mesh.devices.shape) for d in group])
        varies |= (coords // ici != coords[0] // ici).any(axis=0)
    return tuple(axis for axis, v in zip(MESH_AXES, varies, strict=True) if v)


def summarize(hlo: str, mesh: Mesh, dcn: Mapping[str, int]) -> Summary:
    """Classify `hlo`'s collectives (the program compiled over `mesh`, split across slices as
    `dcn` says: mesh axis -> slices) as crossing slices or not."""
    devices: list[jax.Device] = list(mesh.devices.flat)
    slices = group_by_slice(devices)
    header = re.search(r"num_partitions=(\d+)", hlo.split("\n", 1)[0])
    # a program per slice numbers its partitions within the slice (all slices alike)
    program = devices if header and int(header.group(1)) == len(devices) else slices[0]
    by_id = {device.id: device for device in devices}
    crossing: dict[tuple[str, tuple[str, ...]], list[Collective]] = {}
    within: dict[str, int] = {}
    for collective in parse(hlo, [sorted(d.id for d in group) for group in slices]):
        groups = collective.groups or (tuple(range(len(program))),)
        members = [[by_id[i] if collective.dcn else program[i] for i in group] for group in groups]
        if not any(len({slice_index(d) for d in group}) > 1 for group in members):
            within[collective.kind] = within.get(collective.kind, 0) + 1
            continue
        key = (collective.kind, _crossed_axes(members, mesh, dcn))
        crossing.setdefault(key, []).append(collective)
    rows = []
    for (kind, axes), ops in sorted(crossing.items()):
        once = [op.bytes for op in ops if not op.in_loop]
        looped = [op.bytes for op in ops if op.in_loop]
        rows.append(Traffic(kind, axes, len(once), sum(once), len(looped), sum(looped)))
    return Summary(rows, dict(sorted(within.items())))
