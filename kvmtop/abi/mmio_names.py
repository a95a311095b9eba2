"""Names for guest-physical MMIO addresses, as the IO ports have theirs: the well-known x86
ranges (LAPIC, IOAPIC, HPET, PCI MMCONFIG of QEMU's q35), virtio-mmio transports with the
register an offset falls on, and what a VMM's command line says (QEMU's ``-machine microvm``, a
kernel command line's ``virtio_mmio.device=SIZE@ADDR:IRQ``).

Pure: argv in, names out. A name is a guess from where things usually are; the command line
only adds ranges, it never removes the well-known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Intel SDM vol. 3, 11.4.1 (xAPIC register offsets from the LAPIC base)
LAPIC_REGISTERS: dict[int, str] = {
    0x020: "ID", 0x030: "version", 0x080: "TPR", 0x090: "APR", 0x0A0: "PPR", 0x0B0: "EOI",
    0x0C0: "RRD", 0x0D0: "LDR", 0x0E0: "DFR", 0x0F0: "SVR", 0x280: "ESR", 0x2F0: "LVT CMCI",
    0x300: "ICR low", 0x310: "ICR high", 0x320: "LVT timer", 0x330: "LVT thermal",
    0x340: "LVT perf", 0x350: "LVT LINT0", 0x360: "LVT LINT1", 0x370: "LVT error",
    0x380: "timer initial", 0x390: "timer current", 0x3E0: "timer divide",
}  # fmt: skip
# the 8 x 32-bit banks of ISR, TMR and IRR
_LAPIC_BANKS = ((0x100, "ISR"), (0x180, "TMR"), (0x200, "IRR"))

# 82093AA IOAPIC, and the EOI register of version 0x20
IOAPIC_REGISTERS: dict[int, str] = {0x00: "IOREGSEL", 0x10: "IOWIN", 0x40: "EOI"}

# IA-PC HPET specification 1.0a, 2.3
HPET_REGISTERS: dict[int, str] = {
    0x000: "capabilities", 0x010: "config", 0x020: "interrupt status", 0x0F0: "main counter",
}  # fmt: skip
_HPET_TIMER = {0x00: "config", 0x08: "comparator", 0x10: "FSB route"}

# include/uapi/linux/virtio_mmio.h (VIRTIO 1.2, 4.2.2)
VIRTIO_MMIO_REGISTERS: dict[int, str] = {
    0x000: "MagicValue", 0x004: "Version", 0x008: "DeviceID", 0x00C: "VendorID",
    0x010: "DeviceFeatures", 0x014: "DeviceFeaturesSel", 0x020: "DriverFeatures",
    0x024: "DriverFeaturesSel", 0x028: "GuestPageSize", 0x030: "QueueSel",
    0x034: "QueueNumMax", 0x038: "QueueNum", 0x03C: "QueueAlign", 0x040: "QueuePFN",
    0x044: "QueueReady", 0x050: "QueueNotify", 0x060: "InterruptStatus",
    0x064: "InterruptACK", 0x070: "Status", 0x080: "QueueDescLow", 0x084: "QueueDescHigh",
    0x090: "QueueAvailLow", 0x094: "QueueAvailHigh", 0x0A0: "QueueUsedLow",
    0x0A4: "QueueUsedHigh", 0x0AC: "SHMSel", 0x0B0: "SHMLenLow", 0x0B4: "SHMLenHigh",
    0x0B8: "SHMBaseLow", 0x0BC: "SHMBaseHigh", 0x0C0: "QueueReset",
    0x0FC: "ConfigGeneration",
}  # fmt: skip
VIRTIO_MMIO_CONFIG = 0x100  # the device-specific config space begins here

LAPIC_BASE, LAPIC_SIZE = 0xFEE00000, 0x1000
IOAPIC_BASE, IOAPIC_SIZE = 0xFEC00000, 0x1000
HPET_BASE, HPET_SIZE = 0xFED00000, 0x400
Q35_MMCONFIG_BASE, Q35_MMCONFIG_SIZE = 0xB0000000, 0x10000000  # QEMU q35: 256 buses
# QEMU hw/i386/microvm.c: VIRTIO_MMIO_BASE, 512 bytes per transport, VIRTIO_NUM_TRANSPORTS
MICROVM_VIRTIO_BASE, MICROVM_VIRTIO_STRIDE, MICROVM_VIRTIO_COUNT = 0xFEB00000, 0x200, 24


def lapic_register(offset: int) -> str:
    for base, bank in _LAPIC_BANKS:
        if base <= offset < base + 0x80:
            return f"{bank}{(offset - base) >> 4}"
    return LAPIC_REGISTERS.get(offset & ~0xF, "")


def hpet_register(offset: int) -> str:
    if offset >= 0x100:
        timer, reg = divmod(offset - 0x100, 0x20)
        return f"timer{timer} {_HPET_TIMER.get(reg & ~0x7, '')}".rstrip()
    return HPET_REGISTERS.get(offset & ~0x7, "")


def ioapic_register(offset: int) -> str:
    return IOAPIC_REGISTERS.get(offset & ~0xF, "")


def virtio_mmio_register(offset: int) -> str:
    if offset >= VIRTIO_MMIO_CONFIG:
        return f"config+0x{offset - VIRTIO_MMIO_CONFIG:x}"
    return VIRTIO_MMIO_REGISTERS.get(offset & ~0x3, "")


def mmconfig_register(offset: int) -> str:
    """ECAM: bus, device, function and config-space register of an offset."""
    bus, dev, fn, reg = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF
    return f"{bus:02x}:{dev:02x}.{fn} +0x{reg:x}"


@dataclass(frozen=True, slots=True)
class Region:
    base: int
    size: int
    name: str  # "LAPIC", "virtio-mmio 3 (irq 5)"
    register: Callable[[int], str]  # offset -> register name ("" when none)

    def name_of(self, address: int) -> str:
        register = self.register(address - self.base)
        return f"{self.name} {register}" if register else self.name


WELL_KNOWN: tuple[Region, ...] = (
    Region(LAPIC_BASE, LAPIC_SIZE, "LAPIC", lapic_register),
    Region(IOAPIC_BASE, IOAPIC_SIZE, "IOAPIC", ioapic_register),
    Region(HPET_BASE, HPET_SIZE, "HPET", hpet_register),
    Region(Q35_MMCONFIG_BASE, Q35_MMCONFIG_SIZE, "PCI MMCONFIG", mmconfig_register),
)


@dataclass(frozen=True, slots=True)
class MmioNames:
    """The ranges known for one session; :meth:`name` is "" for an address in none."""

    regions: tuple[Region, ...] = WELL_KNOWN

    def name(self, address: int) -> str:
        for region in self.regions:
            if region.base <= address < region.base + region.size:
                return region.name_of(address)
        return ""

    def merged(self, other: MmioNames) -> MmioNames:
        """These ranges first, then the other's that are not here already."""
        have = {(r.base, r.size) for r in self.regions}
        extra = tuple(r for r in other.regions if (r.base, r.size) not in have)
        return MmioNames(self.regions + extra) if extra else self


_SIZE = re.compile(r"(0x[0-9a-f]+|\d+)([kmg]?)", re.IGNORECASE)
_DEVICE = re.compile(
    r"virtio_mmio\.device=(?P<size>\w+)@(?P<base>0x[0-9a-fA-F]+|\d+):(?P<irq>\d+)(?::(?P<id>\d+))?"
)


def parse_size(text: str) -> int | None:
    """Linux memparse(): ``4K``, ``0x200``, ``1M``."""
    m = _SIZE.fullmatch(text)
    if m is None:
        return None
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    return int(m.group(1), 0) << shift


def kernel_devices(text: str) -> list[Region]:
    """The ``virtio_mmio.device=SIZE@ADDR:IRQ[:ID]`` devices a kernel command line declares."""
    regions = []
    for m in _DEVICE.finditer(text):
        size = parse_size(m.group("size"))
        if not size:
            continue
        name = f"virtio-mmio {m.group('id') or len(regions)} (irq {m.group('irq')})"
        regions.append(Region(int(m.group("base"), 0), size, name, virtio_mmio_register))
    return regions


def _machine(argv: Sequence[str]) -> str:
    """QEMU's machine type: ``-machine microvm,x=y``, ``-M type=microvm``, ``--machine=...``."""
    machine = ""
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-machine", "--machine", "-M") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("-machine=", "--machine=")):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        for part in value.split(","):
            if part.startswith("type="):
                machine = part[5:]
            elif "=" not in part and part == value.split(",")[0]:
                machine = part
    return machine


def _devices(argv: Sequence[str]) -> list[str]:
    """The values of ``-device VALUE`` / ``-device=VALUE``."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("-device", "--device") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(("-device=", "--device=")):
            values.append(arg.split("=", 1)[1])
    return values


def microvm_devices(argv: Sequence[str], count: int = MICROVM_VIRTIO_COUNT) -> dict[int, str]:
    """Which ``virtio-*-device`` sits on which microvm transport: they take the transports from
    the last one down, in command-line order, unless one names its bus
    (``bus=virtio-mmio-bus.N``): as QEMU 7.2's `info qtree` shows."""
    free = list(range(count - 1, -1, -1))
    placed: dict[int, str] = {}
    for value in _devices(argv):
        driver, *props = value.split(",")
        if not (driver.startswith("virtio-") and driver.endswith("-device")):
            continue
        bus = next((p.partition("=")[2] for p in props if p.startswith("bus=")), "")
        slot = bus.rpartition(".")[2]
        n = int(slot) if slot.isdigit() else (free[0] if free else None)
        if n is not None and n in free:
            free.remove(n)
            placed[n] = driver.removesuffix("-device")
    return placed


def microvm_transports(count: int = MICROVM_VIRTIO_COUNT,
                       devices: dict[int, str] | None = None) -> list[Region]:  # fmt: skip
    devices = devices or {}
    return [
        Region(MICROVM_VIRTIO_BASE + n * MICROVM_VIRTIO_STRIDE, MICROVM_VIRTIO_STRIDE,
               f"virtio-mmio {n}" + (f" ({devices[n]})" if n in devices else ""),
               virtio_mmio_register)
        for n in range(count)
    ]  # fmt: skip


def from_argv(argv: Iterable[str]) -> MmioNames:
    """What a VMM's command line tells about its MMIO, beside the well-known ranges."""
    args = list(argv)
    regions: list[Region] = []
    for arg in args:
        regions += kernel_devices(arg)
    if _machine(args) == "microvm":
        regions += microvm_transports(devices=microvm_devices(args))
    return MmioNames(tuple(regions) + WELL_KNOWN)


_SHORT = (("virtio-mmio ", "vio"), ("PCI MMCONFIG", "ECAM"))


def short_name(name: str) -> str:
    """A name for narrow panes: ``vio0 QueueNotify``, ``ECAM 00:1f.0 +0x40``."""
    for long, short in _SHORT:
        name = name.replace(long, short)
    return name


# the device part of a name (a region's name), before its register
_DEVICE_PART = re.compile(r"(virtio-mmio \d+(?: \([^)]*\))?|LAPIC|IOAPIC|HPET|PCI MMCONFIG) (.+)")


def fit_name(name: str, width: int) -> str:
    """``name`` in ``width`` columns, keeping its register: the short device name, then without
    its parenthesis (``vio23 InterruptStatus``), then cut in the middle (``vi… InterruptACK``);
    the register is cut only when it alone does not fit."""
    short = short_name(name)
    if len(short) <= width:
        return short
    m = _DEVICE_PART.fullmatch(name)
    if m is None:
        return short[:width]
    device, register = short_name(m.group(1)), m.group(2)
    room = width - len(register) - 1
    bare = device.partition(" (")[0]
    if len(device) > room and len(bare) <= room:
        device = device[: room - 1] + "…" if room >= len(bare) + 6 else bare  # " (vi…" at least
    if len(device) > room:
        device = device[: room - 1] + "…" if room >= 4 else ""
    return (f"{device} {register}" if device else register)[:width]
