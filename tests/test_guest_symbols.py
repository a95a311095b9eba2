"""--guest-symbols: guest code named from a kallsyms copy, a System.map or an ELF file."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import KVMTOP, MODES, assert_one_line_error, kvmtop, write_elf_symbols

from kvmtop.aggregate.guest_code import RipCount
from kvmtop.errors import UsageError
from kvmtop.formats.guest_symbols import code_text, load_guest_symbols

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81001000 t native_io_delay
ffffffff81001040 D some_data
ffffffff81001080 W weak_fn
ffffffffc0400000 t virtio_queue_notify\t[virtio_ring]
ffffffffc0400100 t vring_interrupt\t[virtio_ring]
"""


def test_kallsyms_copy_names_addresses_as_symbol_plus_offset(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    symbols = load_guest_symbols(str(path))
    assert symbols.name(0xFFFFFFFF81001000) == "native_io_delay"
    assert symbols.name(0xFFFFFFFF8100101C) == "native_io_delay+0x1c"
    assert symbols.name(0xFFFFFFFF81001050) is None  # data is not code
    assert symbols.name(0xFFFFFFFF81001084) == "weak_fn+0x4"
    assert symbols.name(0xFFFFFFFFC0400010) == "virtio_queue_notify+0x10"
    assert symbols.name(0xFFFFFFFFC0400100) == "vring_interrupt"
    assert symbols.name(0xFFFFFFFFC0400104) is None  # past the last: its end is not known
    assert symbols.name(0x1000) is None
    assert symbols.name(0xFFFFFFFF81000000) in ("_stext", "startup_64")


def test_a_system_map_reads_the_same(tmp_path):
    path = tmp_path / "System.map"
    path.write_text("0000000000001000 T bios_entry\n0000000000001100 t post_loop\n"
                    "0000000000001200 A __end\n")  # fmt: skip
    symbols = load_guest_symbols(str(path))
    assert symbols.name(0x1104) == "post_loop+0x4" and symbols.name(0x10FF) == "bios_entry+0xff"


def test_kallsyms_read_without_rights_is_one_clear_error(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("".join("0" * 16 + line[16:] + "\n" for line in KALLSYMS.splitlines()))
    with pytest.raises(UsageError, match="every address as 0.*as root"):
        load_guest_symbols(str(path))


def test_an_elf_the_test_writes_gives_sized_symbols(tmp_path):
    path = str(tmp_path / "fw.elf")
    write_elf_symbols(path, [("reset", 0xFFF0, 16), ("poll_uart", 0x1000, 0x20),
                             ("idle", 0x1040, 4)])  # fmt: skip
    symbols = load_guest_symbols(path)
    assert len(symbols) == 3
    assert symbols.name(0x1000) == "poll_uart" and symbols.name(0x101F) == "poll_uart+0x1f"
    assert symbols.name(0x1020) is None  # between two sized symbols: none
    assert symbols.name(0x1042) == "idle+0x2" and symbols.name(0xFFFF) == "reset+0xf"


def test_without_symbols_the_address_and_the_privilege_show():
    assert (
        code_text(RipCount("KVM_EXIT_IO", 0x8, 0x10008, 0, 1, 0), None) == "0x10008 (ip 0x8) kernel"
    )
    assert code_text(RipCount("KVM_EXIT_IO", 0x401000, 0x401000, 3, 1, 0), None) == "0x401000 user"
    assert code_text(RipCount("KVM_EXIT_IO", 0x401000, 0x401000, -1, 1, 0), None) == "0x401000"


@pytest.mark.parametrize("content", [b"", b"hello\nworld\n", b"\x7fELF\x02\x01garbage"])
def test_a_file_with_no_symbols_is_one_clear_line(tmp_path, content):
    path = tmp_path / "bad"
    path.write_bytes(content)
    result = kvmtop("report", str(path), "--guest-symbols", str(path))
    assert_one_line_error(result, 2, str(path))
    assert_one_line_error(kvmtop("report", str(path), "--guest-symbols", str(tmp_path / "none")),
                          2, "cannot read guest symbols")  # fmt: skip


@pytest.mark.kvm
@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_c_vmm_s_exits_are_named_from_an_elf(tmp_path, timed_vmm, mode):
    """timed_vmm's mix guest at 0x1000: `out 0x80` (2 bytes), a byte store (3), a jmp back."""
    elf = str(tmp_path / "guest.elf")
    write_elf_symbols(elf, [("out_post", 0x1000, 2), ("store_ds", 0x1002, 3),
                            ("jump_back", 0x1005, 2)])  # fmt: skip
    out = tmp_path / "r.kvmtop"
    result = subprocess.run([*KVMTOP, "record", "--rip", "-o", str(out), *MODES[mode], "--",
                             timed_vmm, "400", "0", "mix"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(kvmtop("report", str(out), "--json", "--guest-symbols", elf).stdout)
    code = {(r["reason"], r["symbol"], r["rip"]): r["count"]
            for r in report["vcpus"]["0"]["guest_code"]["by_exits"] if "symbol" in r}  # fmt: skip
    # past the completed `out` and the completed store
    assert code == {("KVM_EXIT_IO", "store_ds", 0x1002): 200,
                    ("KVM_EXIT_MMIO", "jump_back", 0x1005): 200}  # fmt: skip
    lines = kvmtop("export", str(out), "--jsonl", "-", "--guest-symbols", elf).stdout.splitlines()
    named = [json.loads(line).get("symbol") for line in lines]
    assert named.count("store_ds") == 200 and named.count("jump_back") == 200
    rows = kvmtop("export", str(out), "--csv", "-", "--guest-symbols", elf).stdout.splitlines()
    assert rows[0].endswith(",rip,linear,symbol")
    assert sum(row.endswith(f",{0x1002},{0x1002},store_ds") for row in rows) == 200
    trace = json.loads(kvmtop("export", str(out), "--perfetto", "-", "--guest-symbols", elf).stdout)
    names = [e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert sum(name.endswith("IO 0x80 out @ store_ds") for name in names) >= 199
