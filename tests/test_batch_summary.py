"""The batch summary: the C module returns exactly what its Python twin does, on any records."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtop.abi.record_layout import (
    EXIT,
    EXIT_CYCLE,
    F_CYCLE,
    HELD,
    KIND_DATA,
    KIND_EXIT,
    KIND_HELD,
    KIND_LONG,
    KIND_RIP,
    LONG,
    RIP,
)
from kvmtop.aggregate import batch_summary as summary
from kvmtop.model.events import ExitEvent, GuestRip
from kvmtop.model.records import pack_events
from kvmtop.native import load

native = load("_summary")
needs_native = pytest.mark.skipif(native is None, reason="kvmtop.native._summary is not built")

INT64 = st.integers(-(2**63), 2**63 - 1)

exit_record = st.builds(
    lambda flags, vcpu, reason, t, guest, b, a: EXIT.pack(
        KIND_EXIT, flags, vcpu, reason, t, guest, b, a
    ),  # fmt: skip
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 65535]),
    st.sampled_from([2, 6, 5, 10, 0, 2**32 - 1]),
    st.one_of(st.integers(-(10**10), 10**10), INT64),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 4, 257, 2**32 - 1]),
    st.sampled_from([0, 0x80, 0x3F8, 2**64 - 1]),
)
long_record = st.builds(lambda ns: LONG.pack(KIND_LONG, ns), st.integers(0, 2**64 - 1))
data_record = st.builds(lambda n: bytes([KIND_DATA, n]) + bytes(30), st.integers(0, 30))
held_record = st.builds(  # the times' sums stay within int64, as real ones do
    lambda stops, low, seen, unseen, high: HELD.pack(KIND_HELD, stops, low, seen, unseen, high),
    st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**61),
    st.integers(0, 2**61), st.sampled_from([0, 1, 2**61]),
)  # fmt: skip
rip_record = st.builds(  # few addresses, so that exits share them
    lambda flags, cpl, rip, linear: RIP.pack(KIND_RIP, flags, cpl, rip, linear),
    st.sampled_from([0, 1, 3]), st.sampled_from([0, 3, 255]),
    st.sampled_from([0, 0x1002, 2**64 - 1]), st.sampled_from([0x1002, 0xF1002]),
)  # fmt: skip
records_strategy = st.lists(
    st.one_of(
        exit_record, exit_record, exit_record, long_record, data_record, held_record, rip_record
    ),
    max_size=60,
).map(b"".join)


@needs_native
@settings(max_examples=300, deadline=None)
@given(records=records_strategy, base_ns=INT64, recent=st.integers(-1, 5))
def test_native_and_pure_summaries_are_equal(records: bytes, base_ns: int, recent: int) -> None:
    assert native.summarize(records, base_ns, recent) == summary.summarize(records, base_ns, recent)


@needs_native
@pytest.mark.parametrize(
    ("records", "message"),
    [
        (bytes(31), "31 bytes are not a whole number of records"),
        (pack_events([ExitEvent(0, 2, 0, 1, 2)], 0) + b"\x04" + bytes(31), "record 1 has kind 4"),
        (b"\x00" + bytes(31), "record 0 has kind 0"),
    ],
)
def test_both_refuse_records_that_are_no_exit(records: bytes, message: str) -> None:
    for summarize in (native.summarize, summary.summarize):
        with pytest.raises(ValueError, match=message):
            summarize(records, 0, 10)


def test_a_summary_groups_by_vcpu_reason_and_errno_with_handling_on_the_previous_exit() -> None:
    events = [
        ExitEvent(0, 2, 0, 1_000, 1_100, 0x80, 1 | 1 << 8, 1),  # IO out, guest 100
        ExitEvent(1, 6, 0, 1_050, 1_060, 0xD0000, 4, 0),  # MMIO read on vCPU 1
        ExitEvent(0, 2, 0, 1_400, 1_900, 0x80, 1 | 1 << 8, 1),  # IO handled in 300
        ExitEvent(0, 10, 4, 2_000, 2**33, flags=EXIT_CYCLE),  # EINTR, one-stop: no handling
    ]
    records = pack_events(events, 1_000)
    exits, first, last, groups, seconds, io, mmio, vcpus, rips = summary.summarize(
        records, 1_000, 2
    )
    assert (exits, first, last) == (4, 1_100, 2**33)
    assert [g[:7] for g in groups] == [
        (0, 2, 0, 2, 600, 100, 500),
        (1, 6, 0, 1, 10, 10, 10),
        (0, 10, 4, 1, 2**33 - 2_000, 2**33 - 2_000, 2**33 - 2_000),
    ]
    assert groups[0][8:12] == (1, 300, 300, 300)  # handled once, between its two IO exits
    pairs = (summary.bucket_of(100), 1, summary.bucket_of(500), 1)  # (bucket, count), flat
    assert groups[0][7] == pairs
    assert seconds == [(0, 0, 2), (1, 0, 1), (2, 8, 1)]
    assert io == [(0, 0x80, True, 1, 2)] and mmio == [(1, 0xD0000, 4, False, 1)]
    v0, v1 = vcpus
    assert v0[:7] == (0, 3, 1_000, 1, 2**33, 10, 4)  # first flags: F_WRITE
    assert v0[8] == 2 and v0[7] == records[64:]  # its last two exits, as records
    assert v1[:4] == (1, 1, 1_050, 0) and v1[7] == records[32:64]
    assert vcpus[0][3] & F_CYCLE == 0
    assert rips == [] and v0.last_rip == v1.last_rip == -1  # no RIP records


def test_net_handling_takes_off_the_time_the_next_exit_says_its_thread_was_held() -> None:
    events = [
        ExitEvent(0, 2, 0, 1_000, 1_100, 0x80, 1 | 1 << 8, 1),
        ExitEvent(
            0,
            2,
            0,
            1_400,
            1_900,
            0x80,
            1 | 1 << 8,
            1,
            held_stops=3,
            held_seen_ns=50,
            held_unseen_ns=70,
        ),  # handled in 300, of which kvmtop held it 120
        ExitEvent(0, 6, 0, 2_000, 2_100, 0xD0000, 4, 0),  # handled in 100: nothing measured
    ]
    records = pack_events(events, 0)
    summed = summary.summarize(records, 0, 2)
    groups, vcpus = summed.groups, summed.vcpus
    io = groups[0]
    assert io[8:12] == (2, 400, 100, 300) and io[13:17] == (1, 180, 180, 180)
    assert io[18:] == (0, 250)  # no most: the net is at least 0; the least unseen: 0
    assert vcpus[0][9:12] == (-1, -1, -1)  # its first exit has no HELD record
    vcpus = summary.summarize(records[32:], 0, 2).vcpus  # the 2nd first
    assert vcpus[0][9:12] == (120, 50, -1)


def test_the_net_bound_takes_off_the_most_and_the_least_the_stops_held_the_thread() -> None:
    held = {"held_stops": 3, "held_seen_ns": 50, "held_unseen_ns": 70}
    events = [
        ExitEvent(0, 2, 0, 1_000, 1_100, 0x80, 1, 1),
        ExitEvent(0, 2, 0, 1_400, 1_900, 0x80, 1, 1, **held, held_unseen_low_ns=30,
                  held_unseen_high_ns=150),
        ExitEvent(0, 2, 0, 2_000, 2_100, 0x80, 1, 1, **held, held_unseen_low_ns=30,
                  held_unseen_high_ns=20),
    ]  # fmt: skip
    for summarize in (summary.summarize, native.summarize) if native else (summary.summarize,):
        io = summarize(pack_events(events, 0), 0, 0)[3][0]
        # handled in 300 and 100, held 50 seen and 30..150 and 30..20 unseen
        assert io[13:17] == (2, 180 + 0, 0, 180)  # net of the estimate (70), at least 0
        assert io[18:] == ((300 - 200) + (100 - 70), (300 - 80) + (100 - 80))


def test_records_before_the_first_exit_belong_to_none() -> None:
    orphans = LONG.pack(KIND_LONG, 99) + bytes([KIND_DATA, 3]) + bytes(30)
    records = orphans + pack_events([ExitEvent(0, 5, 0, 10, 20)], 0)
    summed = summary.summarize(records, 0, 5)
    assert summed.exits == 1 and summed.vcpus[0][7] == records[64:]
    assert struct.unpack_from("<I", records, 64 + 16)[0] == 10


@pytest.mark.parametrize("which", ["pure", "native"])
def test_exits_with_a_rip_count_by_group_and_address_with_the_handling_that_ends_here(
    which: str,
) -> None:
    if which == "native" and native is None:
        pytest.skip("kvmtop.native._summary is not built")
    summarize = summary.named_in(native).summarize if which == "native" else summary.summarize
    at = {0x1002: GuestRip(0x1002, 0xF1002, 0), 0x1005: GuestRip(0x1005, 0xF1005, -1)}
    events = [
        ExitEvent(0, 2, 0, 1_000, 1_100, 0x80, 1 | 1 << 8, 1, rip=at[0x1002]),
        ExitEvent(1, 2, 0, 1_050, 1_060, 0x80, 1 | 1 << 8, 1, rip=at[0x1002]),
        ExitEvent(0, 2, 0, 1_400, 1_900, 0x80, 1 | 1 << 8, 1, rip=at[0x1002]),  # handled 300
        ExitEvent(0, 2, 0, 2_000, 2_100, 0x80, 1 | 1 << 8, 1, rip=at[0x1005]),  # handled 100
        ExitEvent(0, 5, 0, 2_150, 2_200),  # handled 50, after 0x1005; no RIP of its own
        ExitEvent(
            1, 2, 0, 1_000, 3_000, 0x80, 1 | 1 << 8, 1, rip=at[0x1005]
        ),  # entered before 1_060
    ]
    summed = summarize(pack_events(events, 0), 0, 0)
    io0, io1 = 0, 1  # the groups: (vCPU 0, IO), (vCPU 1, IO), then (vCPU 0, HLT)
    assert [g[:3] for g in summed.groups] == [(0, 2, 0), (1, 2, 0), (0, 5, 0)]
    assert summed.rips == [
        (io0, 0x1002, 0xF1002, 0, 2, 2, 300 + 100),  # its second exit's handling ends at 0x1005
        (io1, 0x1002, 0xF1002, 0, 1, 1, 0),  # handled in -60 ns (clocks of two CPUs): cut at 0
        (io0, 0x1005, 0xF1005, -1, 1, 1, 50),
        (io1, 0x1005, 0xF1005, -1, 1, 0, 0),  # its handling is still open
    ]
    assert [v.last_rip for v in summed.vcpus] == [-1, 3]  # vCPU 0's last exit has no RIP
