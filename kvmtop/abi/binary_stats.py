"""KVM's own counters, read from a binary stats fd (``KVM_GET_STATS_FD``, Linux 5.14+).

Pure decoding plus a reader over an fd kvmtop holds: no ptrace, no /proc. The layout is
include/uapi/linux/kvm.h's: a header (flags, name_size, num_desc, id_offset, desc_offset,
data_offset, all u32), an id string, ``num_desc`` descriptors (flags u32, exponent s16, size u16,
offset u32, bucket_size u32, name[name_size]) and the u64 data. Nothing is hard-coded but that
layout: a newer kernel's counters appear by themselves, with their types and units.

A value in the file times ``base ** exponent`` (:meth:`StatDesc.in_unit`) is in the descriptor's unit: ``halt_wait_ns`` is
seconds with exponent -9. Histograms are ``size`` u64 buckets: linear (bucket i holds values in
[i * bucket_size, (i + 1) * bucket_size)) or log2 (bucket 0 holds 0, bucket i holds
[2 ** (i - 1), 2 ** i)).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<6I")
DESC_HEAD = struct.Struct("<IhHII")

TYPE_MASK, UNIT_MASK, BASE_MASK = 0xF, 0xF0, 0xF00
CUMULATIVE, INSTANT, PEAK, LINEAR_HIST, LOG_HIST = range(5)
TYPE_NAMES = {CUMULATIVE: "cumulative", INSTANT: "instant", PEAK: "peak",
              LINEAR_HIST: "linear-hist", LOG_HIST: "log-hist"}  # fmt: skip
UNIT_NAMES = {0: "", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
HISTOGRAMS = (LINEAR_HIST, LOG_HIST)

MAX_DESCRIPTORS = 4096  # far above any kernel's; a header beyond is not a stats fd
MAX_NAME = 1024


class StatsFormatError(ValueError):
    """Bytes that are not a KVM binary stats file."""


@dataclass(frozen=True, slots=True)
class StatDesc:
    name: str
    kind: int  # CUMULATIVE ... LOG_HIST
    unit: str  # "", "bytes", "seconds", "cycles", "boolean", or "unit-N" if unknown
    base: int  # 10 or 2
    exponent: int
    size: int  # u64 values: 1, or a histogram's buckets
    offset: int  # bytes from the start of the data block
    bucket_size: int

    def in_unit(self, raw: float) -> float:
        """A raw value in :attr:`unit`; dividing keeps 1023e-9 as ``1.023e-06``."""
        if self.exponent < 0:
            divisor: int = self.base**-self.exponent
            return raw / divisor
        factor: int = self.base**self.exponent
        return float(raw * factor)

    @property
    def histogram(self) -> bool:
        return self.kind in HISTOGRAMS

    def bucket_low(self, i: int) -> int:
        """The smallest raw value bucket ``i`` holds."""
        if self.kind == LINEAR_HIST:
            return i * self.bucket_size
        return 0 if i == 0 else 1 << (i - 1)


@dataclass(frozen=True, slots=True)
class StatsLayout:
    ident: str  # e.g. "kvm-1234" for a VM, "kvm-1234/vcpu-0" for a vCPU
    descs: tuple[StatDesc, ...]
    data_offset: int
    data_size: int  # bytes of u64 data to read


def parse_layout(blob: bytes) -> StatsLayout:
    """Header, id and descriptors from the start of a stats file (``blob`` must reach the data
    offset)."""
    if len(blob) < HEADER.size:
        raise StatsFormatError("stats header truncated")
    _flags, name_size, num_desc, id_offset, desc_offset, data_offset = HEADER.unpack_from(blob)
    if num_desc > MAX_DESCRIPTORS or name_size > MAX_NAME:
        raise StatsFormatError(f"implausible stats header ({num_desc} descriptors)")
    step = DESC_HEAD.size + name_size
    if desc_offset + num_desc * step > len(blob) or id_offset + name_size > len(blob):
        raise StatsFormatError("stats descriptors truncated")
    ident = _cstring(blob[id_offset : id_offset + name_size])
    descs = []
    data_size = 0
    for i in range(num_desc):
        at = desc_offset + i * step
        flags, exponent, size, offset, bucket_size = DESC_HEAD.unpack_from(blob, at)
        name = _cstring(blob[at + DESC_HEAD.size : at + step])
        unit = (flags & UNIT_MASK) >> 4
        base = 2 if (flags & BASE_MASK) >> 8 == 1 else 10
        descs.append(StatDesc(name, flags & TYPE_MASK, UNIT_NAMES.get(unit, f"unit-{unit}"),
                              base, exponent, max(1, size), offset, bucket_size))  # fmt: skip
        data_size = max(data_size, offset + 8 * max(1, size))
    return StatsLayout(ident, tuple(descs), data_offset, data_size)


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


Values = dict[str, "int | tuple[int, ...]"]


def decode_values(layout: StatsLayout, data: bytes) -> Values:
    """Raw values by name: an int, or a tuple of bucket counts for a histogram."""
    if len(data) < layout.data_size:
        raise StatsFormatError("stats data truncated")
    out: Values = {}
    for d in layout.descs:
        if d.histogram:
            out[d.name] = struct.unpack_from(f"<{d.size}Q", data, d.offset)
        else:
            out[d.name] = struct.unpack_from("<Q", data, d.offset)[0]
    return out


def histogram_percentile(desc: StatDesc, buckets: tuple[int, ...], q: float) -> float | None:
    """The low edge of the bucket holding the ``q`` quantile, in the descriptor's unit; None
    when the histogram is empty."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return desc.in_unit(desc.bucket_low(i))
    return desc.in_unit(desc.bucket_low(len(buckets) - 1))


class StatsFile:
    """One stats fd kvmtop holds (owned: :meth:`close` closes it). Reading costs one pread for
    the data, none of the VM's time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        head = os.pread(fd, HEADER.size, 0)
        if len(head) < HEADER.size:
            raise StatsFormatError("stats header truncated")
        data_offset = HEADER.unpack_from(head)[5]
        if data_offset > 1 << 20:
            raise StatsFormatError("implausible stats header")
        self.layout = parse_layout(os.pread(fd, data_offset, 0))

    @property
    def ident(self) -> str:
        return self.layout.ident

    def read(self) -> Values:
        layout = self.layout
        return decode_values(layout, os.pread(self.fd, layout.data_size, layout.data_offset))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
