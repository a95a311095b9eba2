"""One source for the ABI: KVM's exit numbers, ``struct kvm_run``'s offsets and the record layout
are declared once, in Python (kvmtop/abi/, kvmtop/xlat_exit.py); the C modules get them from the
header setup.py writes from those declarations (kvmtop/abi/c_header.py), and declare none of
them again."""

from __future__ import annotations

import pathlib
import re
import struct

from kvmtop.abi import record_layout
from kvmtop.abi.c_header import definitions, field_offsets, render

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kvmtop"
HEADER_NAMES = {name for name, _value, _where in definitions()}


def test_the_c_sources_include_the_header_and_define_none_of_its_names():
    for source in ("hotloop.c", "summary.c", "sampler.c"):
        text = (PACKAGE / "native" / source).read_text()
        assert '#include "kvmtop_abi.h"' in text, source
        defined = set(re.findall(r"^\s*#\s*define\s+(\w+)", text, re.M))
        assert not defined & HEADER_NAMES, (source, sorted(defined & HEADER_NAMES))


def test_no_python_module_declares_an_exit_number_a_kvm_run_offset_or_a_record_layout_again():
    declared = re.compile(
        r"^\s*(?:KVM_EXIT_\w+|RUN_UNION|RUN_EXIT_REASON|RUN_IMMEDIATE_EXIT|\w*EXIT_REASON_OFFSET|"
        r"KVM_RUN|KVM_CREATE_VCPU|RECORD_SIZE|KIND_\w+)\s*(?:,\s*\w+\s*)*=",
        re.M,
    )
    layouts = {layout.format for layout, _names in record_layout.FIELDS.values()}
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "abi" or path.name == "launcher.py":
            continue  # the declarations; the launcher imports nothing of kvmtop on purpose
        text = path.read_text()
        assert not declared.search(text), (path, declared.search(text))
        for layout in layouts:
            assert f'"{layout}"' not in text, (path, layout)


def test_every_field_offset_is_where_struct_packs_that_field():
    for record, (layout, names) in record_layout.FIELDS.items():
        offsets = field_offsets(layout, names)
        values: list[object] = []
        for i, name in enumerate(names):
            values.append(b"\xab" * 3 if name == "bytes" else i + 1)
        packed = layout.pack(*values)
        for name, value in zip(names, values, strict=True):
            at = offsets[name]
            if isinstance(value, bytes):
                assert packed[at : at + 3] == value, (record, name)
            else:
                assert packed[at] == value, (record, name)


def test_the_header_defines_each_name_once_with_the_python_value():
    text = render()
    defines = re.findall(r"^#define (\w+) (\S+)$", text, re.M)
    names = [name for name, _value in defines if name != "KVMTOP_ABI_H"]
    assert len(names) == len(set(names))
    values = dict(defines)
    assert int(values["KVM_EXIT_IO"]) == 2 and int(values["KVM_EXIT_MMIO"]) == 6
    assert int(values["RECORD_SIZE"]) == record_layout.RECORD_SIZE == struct.calcsize("<BBHIqIIQ")
    assert int(values["EXIT_AT_T_EXIT"]) == 8  # T_EXIT's own offset (records.py reads it there)
