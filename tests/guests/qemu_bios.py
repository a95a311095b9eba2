"""A 64 KiB flat BIOS image for real QEMU that makes a known number of exits.

The reset vector (offset 0xFFF0, CPU address F000:FFF0) jumps to real-mode code at offset 0:
spin (no exits), N x `out PORT, al`, M x byte writes to a ROM address (QEMU's pc.rom at
0xC0000: writes exit as MMIO), then `out 0xf4, al` with al=0, which isa-debug-exit turns into
QEMU's exit status 1. Exits: IO = N + 1, MMIO = M.
"""

from __future__ import annotations

import struct

BIOS_SIZE = 0x10000
DEBUG_EXIT_PORT = 0xF4


def _counted_loop(body: bytes, count: int) -> bytes:
    """`mov ecx, count; L: body; loop L` with 32-bit ECX (0x66/0x67 prefixes in real mode)."""
    if count <= 0:
        return b""
    rel = -(len(body) + 3)
    return b"\x66\xb9" + struct.pack("<I", count) + body + b"\x67\xe2" + struct.pack("<b", rel)


def build_bios(
    outs: int,
    mmio_writes: int,
    spin_iterations: int = 0,
    port: int = 0x80,
    mmio_addr: int = 0xC0000,
) -> bytes:
    assert 0 <= port < 0x100, "out imm8 only"
    code = _counted_loop(b"", spin_iterations)  # `loop $`: spins without exits
    code += _counted_loop(b"\xe6" + bytes([port]), outs)  # out port, al
    segment, offset = mmio_addr >> 4, mmio_addr & 0xF
    code += b"\xb8" + struct.pack("<H", segment) + b"\x8e\xd8"  # mov ax, seg; mov ds, ax
    code += _counted_loop(b"\xa2" + struct.pack("<H", offset), mmio_writes)  # mov [off], al
    code += b"\x30\xc0" + b"\xe6" + bytes([DEBUG_EXIT_PORT])  # xor al, al; out 0xf4, al
    code += b"\xf4\xeb\xfd"  # hlt; jmp back to hlt
    image = bytearray(b"\xf4" * BIOS_SIZE)
    image[: len(code)] = code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # jmp far F000:0000
    return bytes(image)


def qemu_command(bios_path: str, *extra: str) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-enable-kvm",
        "-bios",
        bios_path,
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "16",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        *extra,
    ]
