"""Guest programs as 16-bit real-mode machine code, built without an assembler.

Each method emits one instruction; its encoding is commented once. Labels are resolved at
:meth:`Code.assemble`. Used by the built-in VMM (``kvmtop.minivmm.vmm``) and the tests' QEMU BIOS.
"""

from __future__ import annotations

import struct

DEBUG_EXIT_PORT = 0xF4  # `out 0xf4, al`: isa-debug-exit in QEMU, "exit with al" in minivmm
PHASE_PORT = 0x5A0  # `in al, dx` here: the demo asks minivmm which mix of exits to make now


class Code:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self._rel8: list[tuple[int, str]] = []  # (offset of the rel8 byte, label)
        self._abs16: list[tuple[int, str]] = []

    def label(self, name: str) -> Code:
        self.labels[name] = len(self.buf)
        return self

    def emit(self, *parts: int | bytes) -> Code:
        for part in parts:
            self.buf += part if isinstance(part, bytes) else bytes([part])
        return self

    def _rel(self, opcode: bytes, target: str) -> Code:
        self.buf += opcode
        self._rel8.append((len(self.buf), target))
        self.buf.append(0)
        return self

    # control flow
    def jmp(self, target: str) -> Code:
        return self._rel(b"\xeb", target)  # EB rel8: jmp short

    def je(self, target: str) -> Code:
        return self._rel(b"\x74", target)  # 74 rel8

    def jne(self, target: str) -> Code:
        return self._rel(b"\x75", target)  # 75 rel8

    def loop_ecx(self, target: str) -> Code:
        return self._rel(b"\x67\xe2", target)  # 67: 32-bit address size, so `loop` counts ECX

    def hlt(self) -> Code:
        return self.emit(0xF4)

    # moves
    def mov_ecx(self, value: int) -> Code:
        return self.emit(b"\x66\xb9" + struct.pack("<I", value))  # 66 B9 imm32

    def mov_eax(self, value: int) -> Code:
        return self.emit(b"\x66\xb8" + struct.pack("<I", value))  # 66 B8 imm32

    def mov_ax(self, value: int) -> Code:
        return self.emit(b"\xb8" + struct.pack("<H", value))  # B8 imm16

    def mov_dx(self, value: int) -> Code:
        return self.emit(b"\xba" + struct.pack("<H", value))  # BA imm16

    def mov_al(self, value: int) -> Code:
        return self.emit(0xB0, value & 0xFF)  # B0 imm8

    def mov_si(self, target: str) -> Code:
        self.buf += b"\xbe"  # BE imm16: the label's offset in the code segment
        self._abs16.append((len(self.buf), target))
        self.buf += b"\0\0"
        return self

    def mov_ds_ax(self) -> Code:
        return self.emit(0x8E, 0xD8)  # 8E /3: mov ds, ax

    def mov_es_ax(self) -> Code:
        return self.emit(0x8E, 0xC0)  # 8E /0: mov es, ax

    def mov_ax_cs(self) -> Code:
        return self.emit(0x8C, 0xC8)  # 8C /1: mov ax, cs

    def store_es_al(self, offset: int) -> Code:
        return self.emit(
            b"\x26\xa2" + struct.pack("<H", offset)
        )  # 26: ES override; A2: mov [moffs], al

    def load_al_es(self, offset: int) -> Code:
        return self.emit(b"\x26\xa0" + struct.pack("<H", offset))  # A0: mov al, [moffs]

    def store_ds_al(self, offset: int) -> Code:
        return self.emit(b"\xa2" + struct.pack("<H", offset))

    def lodsb(self) -> Code:
        return self.emit(0xAC)  # AC: al = ds:[si++]

    def test_al(self) -> Code:
        return self.emit(0x84, 0xC0)  # 84 /r: test al, al

    def cmp_al(self, value: int) -> Code:
        return self.emit(0x3C, value & 0xFF)  # 3C imm8

    # port IO
    def out_imm(self, port: int) -> Code:
        assert port < 0x100
        return self.emit(0xE6, port)  # E6 imm8: out imm8, al

    def in_imm(self, port: int) -> Code:
        assert port < 0x100
        return self.emit(0xE4, port)  # E4 imm8: in al, imm8

    def out_dx(self) -> Code:
        return self.emit(0xEE)  # EE: out dx, al

    def in_dx(self) -> Code:
        return self.emit(0xEC)  # EC: in al, dx

    def out_dx_eax(self) -> Code:
        return self.emit(0x66, 0xEF)  # 66 EF: out dx, eax (4 bytes)

    def in_dx_eax(self) -> Code:
        return self.emit(0x66, 0xED)  # 66 ED: in eax, dx

    # composites
    def repeat(self, count: int, body: Code) -> Code:
        """`mov ecx, count; L: body; loop L` (nothing when count is 0: ECX=0 would wrap)."""
        if count <= 0:
            return self
        name = f"repeat{len(self.buf)}"
        self.mov_ecx(count).label(name)
        base = len(self.buf)
        self.buf += body.buf
        for at, target in body._rel8:
            self._rel8.append((base + at, f"{name}.{target}"))
        for target, where in body.labels.items():
            self.labels[f"{name}.{target}"] = base + where
        return self.loop_ecx(name)

    def assemble(self) -> bytes:
        out = bytearray(self.buf)
        for at, target in self._rel8:
            rel = self.labels[target] - (at + 1)
            assert -128 <= rel <= 127, f"jump to {target} is too far ({rel})"
            out[at] = rel & 0xFF
        for at, target in self._abs16:
            struct.pack_into("<H", out, at, self.labels[target])
        return bytes(out)


def counted(
    outs: int,
    mmio_writes: int,
    spin_iterations: int = 0,
    port: int = 0x80,
    mmio_addr: int = 0xC0000,
    exit_status: int = 0,
    ins: int = 0,
    mmio_reads: int = 0,
    in_port: int | None = None,
) -> bytes:
    """Spin without exits, then `outs` x `out port, al`, `ins` x `in al, port`, `mmio_writes`
    x a byte write to `mmio_addr`, `mmio_reads` x a byte read of it, then `out 0xf4, al` with
    al = exit_status. Exits: IO outs + ins + 1, MMIO writes + reads (fewer where the VMM
    coalesces the port or address). ``in_port``: the port of the ins (default: ``port``)."""
    code = Code()
    code.repeat(spin_iterations, Code())  # `loop $`
    code.repeat(outs, Code().out_imm(port))
    code.repeat(ins, Code().in_imm(port if in_port is None else in_port))
    code.mov_ax(mmio_addr >> 4).mov_es_ax()
    code.repeat(mmio_writes, Code().store_es_al(mmio_addr & 0xF))
    code.repeat(mmio_reads, Code().load_al_es(mmio_addr & 0xF))
    code.mov_al(exit_status).out_imm(DEBUG_EXIT_PORT)
    code.label("halt").hlt().jmp("halt")
    return code.assemble()


def counted_rips(
    outs: int, mmio_writes: int, spin_iterations: int = 0, ins: int = 0, mmio_reads: int = 0
) -> dict[str, int]:
    """Where :func:`counted` (same arguments) leaves the guest at each kind of exit, as KVM
    reports RIP here: past a completed `out` or MMIO write, on an `in` or MMIO read (the
    instruction the VMM's value completes). Keys: out, in, mmio_write, mmio_read, exit."""
    loop = 6  # `mov ecx, imm32` before each repeated body (none for a count of 0)
    at = loop + 3 if spin_iterations > 0 else 0  # `loop $`
    sites = {"out": at + loop + 2}  # E6 imm8
    at += loop + 2 + 3 if outs > 0 else 0
    sites["in"] = at + loop
    at += loop + 2 + 3 if ins > 0 else 0
    at += 3 + 2  # mov ax, imm16; mov es, ax
    sites["mmio_write"] = at + loop + 4  # 26 A2 moffs16
    at += loop + 4 + 3 if mmio_writes > 0 else 0
    sites["mmio_read"] = at + loop
    at += loop + 4 + 3 if mmio_reads > 0 else 0
    sites["exit"] = at + 2 + 2  # mov al, imm8; out 0xf4, al
    return sites


def demo(vcpu: int, mmio_base: int = 0xD0000) -> bytes:
    """An endless, varied mix: each round asks the VMM for a phase (port PHASE_PORT) and makes
    that phase's exits, then halts (the VMM paces rounds by sleeping on hlt)."""
    return demo_code(vcpu, mmio_base).assemble()


def demo_code(vcpu: int, mmio_base: int = 0xD0000) -> Code:
    """:func:`demo`'s code, with its labels (``Code.labels``: top, serial, mmio, pci...)."""
    c = Code()
    c.mov_ax_cs().mov_ds_ax()  # strings live in the code segment
    c.mov_ax(mmio_base >> 4).mov_es_ax()
    c.label("top")
    c.mov_dx(PHASE_PORT).in_dx()
    c.cmp_al(0).je("serial")
    c.cmp_al(1).je("mmio")
    c.jmp("pci")

    # phase 0: a line of text on the serial port, polling its line status register
    c.label("serial").mov_si("text")
    c.label("char").lodsb().test_al().je("serial_done")
    c.mov_dx(0x3F8).out_dx().mov_dx(0x3FD).in_dx()
    c.jmp("char")
    c.label("serial_done").jmp("round_end")

    # phase 1: device registers by MMIO, reads and writes, plus the RTC
    c.label("mmio")
    c.repeat(6, Code().store_es_al(0x10).load_al_es(0x14))
    c.repeat(2, Code().mov_al(0x0A).out_imm(0x70).in_imm(0x71))
    c.jmp("round_end")

    # phase 2: PCI config space walk and POST codes
    c.label("pci")
    c.repeat(4, Code().mov_dx(0xCF8).mov_eax(0x80000000).out_dx_eax().mov_dx(0xCFC).in_dx_eax())
    c.repeat(3, Code().mov_al(0x42).out_imm(0x80))

    c.label("round_end").hlt().jmp("top")
    c.label("text").emit(f"vCPU {vcpu} says hi\n".encode() + b"\0")
    return c


# A flat GDT: null, 32-bit code (selector 0x08) and data (0x10), both base 0 limit 4 GiB
_FLAT_GDT = bytes(8) + bytes.fromhex("ffff0000009acf00") + bytes.fromhex("ffff00000092cf00")


def flat32_accesses(
    accesses: list[tuple[int, bool, int]], load_base: int = 0xF0000, exit_status: int = 0
) -> bytes:
    """Code for ``load_base`` (a BIOS at F000:0000) that enters 32-bit protected mode with flat
    segments, makes each (address, write, count) of ``accesses`` as `count` x a 32-bit load or
    store there (any guest-physical address below 4 GiB), then `out 0xf4, al` with al =
    exit_status. Exits: MMIO one per access the VMM emulates, IO 1."""
    body = bytearray()
    for address, write, count in accesses:
        body += b"\xbb" + struct.pack("<I", address)  # mov ebx, address
        body += b"\xb9" + struct.pack("<I", count)  # mov ecx, count
        body += b"\x89\x03" if write else b"\x8b\x03"  # mov [ebx], eax / mov eax, [ebx]
        body += b"\xe2\xfc"  # loop back to the access
    body += b"\xb0" + bytes([exit_status]) + b"\xe6" + bytes([DEBUG_EXIT_PORT])  # out 0xf4, al
    body += b"\xf4\xeb\xfd"  # hlt; jmp to the hlt
    real = 7 + 11 + 8  # cli + lgdt, cr0.PE, the far jump
    gdtr = real
    gdt = gdtr + 6
    pm = gdt + len(_FLAT_GDT)
    code = bytearray(b"\xfa\x2e\x0f\x01\x16" + struct.pack("<H", gdtr))  # cli; lgdt cs:[gdtr]
    code += b"\x0f\x20\xc0\x66\x83\xc8\x01\x0f\x22\xc0\x90"  # mov eax,cr0; or eax,1; mov cr0,eax
    code += b"\x66\xea" + struct.pack("<IH", load_base + pm, 0x08)  # jmp far 0x08:pm
    assert len(code) == real
    code += struct.pack("<HI", len(_FLAT_GDT) - 1, load_base + gdt) + _FLAT_GDT
    code += b"\x66\xb8\x10\x00\x8e\xd8"  # mov ax, 0x10; mov ds, ax
    return bytes(code + body)
