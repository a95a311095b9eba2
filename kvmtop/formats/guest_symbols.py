"""Naming guest code (``--guest-symbols FILE``): a copy of the guest's ``/proc/kallsyms`` (as
``perf kvm --guestkallsyms`` takes it: KASLR offsets already applied), a ``System.map``, or an
ELF file with a symbol table (``vmlinux``, a firmware or kernel image). A guest address becomes
``symbol+0xoff``, resolved once per distinct address and cached. Reads the file once; no other
I/O.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Protocol

from kvmtop.errors import UsageError

ELF_MAGIC = b"\x7fELF"
# kallsyms and System.map: "ffffffff81000000 T _stext" (kallsyms adds " [module]")
_LINE = re.compile(r"^([0-9a-fA-F]+)\s+([A-Za-z])\s+(\S+)")
_CODE_TYPES = frozenset("tTwW")  # text, and weak symbols (nm's letters)
CACHE_MAX = 1 << 16


@dataclass(frozen=True, slots=True)
class _Symbol:
    address: int
    name: str
    size: int  # 0: not known (kallsyms, System.map): it ends where the next one begins
    code: bool = True  # else a symbol that only bounds the one before it (data, absolute)


class GuestSymbols:
    """Sorted guest symbols; :meth:`name` gives ``symbol+0xoff`` or None."""

    def __init__(self, symbols: list[_Symbol], source: str) -> None:
        symbols.sort(key=lambda s: (s.address, not s.code, -s.size, s.name))
        self._symbols = symbols
        self._starts = [s.address for s in symbols]
        self._cache: dict[int, str | None] = {}
        self.source = source

    def __len__(self) -> int:
        return len(self._symbols)

    def name(self, address: int) -> str | None:
        """``symbol+0xoff`` of the symbol ``address`` lies in (``symbol`` at its start); None
        before the first, past a sized symbol's end, or past the last unsized one."""
        if address in self._cache:
            return self._cache[address]
        found = self._lookup(address)
        if len(self._cache) < CACHE_MAX:
            self._cache[address] = found
        return found

    def _lookup(self, address: int) -> str | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        symbol = self._symbols[i]
        offset = address - symbol.address
        if not symbol.code or symbol.size and offset >= symbol.size:
            return None
        if not symbol.size and i == len(self._symbols) - 1 and offset:
            return None  # past the last symbol of a map: where it ends is not known
        return f"{symbol.name}+{offset:#x}" if offset else symbol.name


def load_guest_symbols(path: str) -> GuestSymbols:
    """The symbols of ``path``; UsageError (one line) if it cannot be read or holds none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read guest symbols {path}: {exc.strerror}") from None
    symbols = _elf_symbols(path, data) if data.startswith(ELF_MAGIC) else _map_symbols(path, data)
    if not symbols:
        raise UsageError(
            f"{path} holds no code symbols: give a guest's /proc/kallsyms copy, its System.map "
            "or an ELF file with a symbol table"
        )
    return GuestSymbols(symbols, path)


def _map_symbols(path: str, data: bytes) -> list[_Symbol]:
    symbols = []
    nonzero = False
    for line in data.decode("utf-8", "replace").splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        address = int(m.group(1), 16)
        nonzero = nonzero or address != 0
        symbols.append(_Symbol(address, m.group(3), 0, m.group(2) in _CODE_TYPES))
    if not any(symbol.code for symbol in symbols):
        return []
    if not nonzero:
        raise UsageError(
            f"{path} gives every address as 0 (kallsyms read without the right to see them): "
            "copy the guest's /proc/kallsyms as root"
        )
    return symbols


def _elf_symbols(path: str, data: bytes) -> list[_Symbol]:
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        elf = ELFFile(io.BytesIO(data))
        symbols = []
        for section in elf.iter_sections():
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.iter_symbols():
                kind = sym["st_info"]["type"]
                if kind in ("STT_FUNC", "STT_NOTYPE") and sym.name and sym["st_value"]:
                    if sym["st_shndx"] == "SHN_UNDEF":
                        continue
                    symbols.append(_Symbol(sym["st_value"], sym.name, sym["st_size"]))
        return symbols
    except (ELFError, ValueError, KeyError) as exc:
        raise UsageError(
            f"cannot read guest symbols {path}: not a valid ELF file ({exc})"
        ) from None


class GuestAddress(Protocol):
    """A guest RIP as an exit (model.events.GuestRip) or a count of them (RipCount) has it."""

    @property
    def rip(self) -> int: ...
    @property
    def linear(self) -> int: ...
    @property
    def cpl(self) -> int: ...


def symbol_of(rip: GuestAddress | None, symbols: GuestSymbols | None) -> str | None:
    return symbols.name(rip.linear) if symbols is not None and rip is not None else None


def code_text(rip: GuestAddress, symbols: GuestSymbols | None) -> str:
    """How a view names a guest code address: its symbol where known, else the address, with
    the guest's privilege where known (kernel: CPL 0, user: 3)."""
    name = symbol_of(rip, symbols)
    where = {0: " kernel", 3: " user"}.get(rip.cpl, f" ring {rip.cpl}" if rip.cpl > 0 else "")
    if name is not None:
        return name
    if rip.linear != rip.rip:
        return f"{rip.linear:#x} (ip {rip.rip:#x}){where}"
    return f"{rip.linear:#x}{where}"
