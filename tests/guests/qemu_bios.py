"""A 64 KiB flat BIOS image for real QEMU that makes a known number of exits.

The reset vector (offset 0xFFF0, CPU address F000:FFF0) jumps to kvmtop.minivmm.guestcode.counted at
offset 0: spin (no exits), N x `out 0x80, al`, M x byte writes to QEMU's pc.rom at 0xC0000
(ROM: writes exit as MMIO), then `out 0xf4, al` with al=0, which isa-debug-exit turns into
QEMU's exit status 1. Exits: IO = N + 1, MMIO = M.
"""

from __future__ import annotations

from kvmtop.minivmm import guestcode

BIOS_SIZE = 0x10000


def build_bios(
    outs: int, mmio_writes: int, spin_iterations: int = 0, port: int = 0x80, ins: int = 0,
    in_port: int | None = None,
) -> bytes:  # fmt: skip
    code = guestcode.counted(outs, mmio_writes, spin_iterations, port=port, mmio_addr=0xC0000,
                             ins=ins, in_port=in_port)  # fmt: skip
    image = bytearray(b"\xf4" * BIOS_SIZE)
    image[: len(code)] = code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # jmp far F000:0000
    return bytes(image)


def write_bios(path: str, outs: int, mmio_writes: int = 0, spin_iterations: int = 0) -> str:
    """:func:`build_bios` written to ``path``; returns the path."""
    with open(path, "wb") as f:
        f.write(build_bios(outs, mmio_writes, spin_iterations))
    return path


def qemu_command(bios_path: str, *extra: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-enable-kvm", "-bios", bios_path, "-nodefaults",
        "-display", "none", "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        *extra,
    ]  # fmt: skip


def build_flat32_bios(accesses: list[tuple[int, bool, int]]) -> bytes:
    """A BIOS that makes ``accesses`` (guestcode.flat32_accesses) from 32-bit protected mode,
    then `out 0xf4, al` with al=0. The reset vector jumps to it as :func:`build_bios`'s does."""
    code = guestcode.flat32_accesses(accesses)
    image = bytearray(b"\xf4" * BIOS_SIZE)
    image[: len(code)] = code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # jmp far F000:0000
    return bytes(image)
