"""Playing a recording back: a clock over the recording's time, and a player thread that feeds
the exits the clock has passed into an ExitStats, the same aggregate a live session fills.

Owns the replay clock (play, pause, speed, seek) and the player thread. Seeking backwards
rebuilds the aggregate from the start of the file (memory stays bounded however long the
recording is); the rebuild runs in the player thread while the last complete aggregate stays on
show, so the UI never waits for it. Never draws, never traces; the only thread that feeds the
aggregate is the player.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from kvmtop.aggregate.exits import ExitStats, StatsSnapshot, VcpuSnapshot
from kvmtop.formats.recording import Recording, open_recording
from kvmtop.model.coalesced import split_coalesced
from kvmtop.model.messages import ExitBatch
from kvmtop.model.records import cut_after, exit_count, first_t_exit
from kvmtop.sources.exit_source import SourceStatus, command_line

SPEEDS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 200.0)
TICK_S = 0.05  # the player feeds what the clock passed 20 times a second
BATCH = 4096  # exits per read: large enough for speed, small enough to notice a new seek soon
NS = 1_000_000_000
END_OF_TIME = 2**62


class StopShare:
    """A batch's ptrace stops, handed out in proportion to its exits as they are fed: the
    stops given after ``k`` of its ``exits`` are ``stops * k // exits`` however the batch is
    cut, and all of them once every exit is in (or at once for a batch of no exits)."""

    def __init__(self, stops: int, exits: int) -> None:
        self.stops, self.exits = stops, exits
        self._fed = self._given = 0

    def take(self, exits: int) -> int:
        self._fed += exits
        due = self.stops if self._fed >= self.exits else self.stops * self._fed // self.exits
        given, self._given = due - self._given, due
        return given


class Replay:
    """A recording played at ``speed`` times real time. All methods return at once; the player
    thread catches up (:attr:`settled` says when it has)."""

    def __init__(self, path: str, speed: float = 1.0, paused: bool = False) -> None:
        self.recording: Recording = open_recording(path)  # RecordingError before any thread
        self.path = path
        # known before it plays through: whether it ends whole, and then when
        self._marked_end_ns = self.recording.end_marker_ns()
        self._ends_whole = self._marked_end_ns is not None
        self.start_ns = self.recording.meta.start_ns
        self.end_ns: int | None = None  # known once the player has read the whole file
        self.speed = speed
        self.paused = paused
        self._lock = threading.Condition()
        self._clock_ns = self.start_ns  # the clock's reading at _clock_wall
        self._clock_wall = time.monotonic()
        self._goal: float | None = None  # a seek_to() waiting for the end to be known
        self._rebuild = False
        self._closing = False
        self._shown: tuple[ExitStats, int] = (self._new_stats(), self.start_ns)
        self._work: ExitStats = self._shown[0]
        self._work_ns = self.start_ns
        self._rebuilding = False
        self._batches: Iterator[ExitBatch] = self.recording.batches(BATCH)
        self._pending: ExitBatch | None = None
        self._stops = StopShare(0, 0)  # the stops of the batch being fed
        self._thread = threading.Thread(target=self._run, name="kvmtop-replay", daemon=True)
        self._thread.start()

    def _new_stats(self) -> ExitStats:
        stats = ExitStats()
        stats.see_command(self.recording.meta.argv)
        return stats

    # --- the clock (any thread) ----------------------------------------------------------------

    def position_ns(self) -> int:
        """Where the clock is now (the player may still be catching up with it)."""
        with self._lock:
            return self._position(time.monotonic())

    def _position(self, wall: float) -> int:
        """Called with the lock held."""
        pos = self._clock_ns
        if not self.paused:
            pos += int((wall - self._clock_wall) * NS * self.speed)
        if self._goal is not None:
            pos = max(pos, self._work_ns)  # reading on to find the end
        if self.end_ns is not None:
            pos = min(pos, self.end_ns)
        return max(self.start_ns, pos)

    def _set_clock(self, position_ns: int) -> None:
        """Called with the lock held."""
        self._clock_wall = time.monotonic()
        self._clock_ns = max(self.start_ns, position_ns)
        if self.end_ns is not None:
            self._clock_ns = min(self._clock_ns, self.end_ns)
        if self._clock_ns < self._work_ns:
            self._rebuild = True
        self._lock.notify()

    def toggle_pause(self) -> None:
        with self._lock:
            self._set_clock(self._position(time.monotonic()))
            self.paused = not self.paused

    def faster(self, step: int) -> None:
        """Move ``step`` places along SPEEDS (negative: slower)."""
        with self._lock:
            self._set_clock(self._position(time.monotonic()))
            i = min(range(len(SPEEDS)), key=lambda k: abs(SPEEDS[k] - self.speed))
            self.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + step))]

    def seek(self, delta_s: float) -> None:
        """Move the clock by ``delta_s`` seconds of recording time (negative: back)."""
        with self._lock:
            position = self._position(time.monotonic())
            self._goal = None
            self._set_clock(position + int(delta_s * NS))

    def seek_to(self, fraction: float) -> None:
        """Jump to a fraction of the recording: 0 is its start, 1 its end. Before the end is
        known, the player reads on to it first."""
        fraction = max(0.0, min(1.0, fraction))
        with self._lock:
            if self.end_ns is None:
                self._goal = fraction
                self._set_clock(self._work_ns)
            else:
                self._goal = None
                self._set_clock(self.start_ns + int((self.end_ns - self.start_ns) * fraction))

    # --- what the views read (any thread) ----------------------------------------------------

    def version(self) -> object:
        return (
            self._shown,
            self.paused,
            self.speed,
            self.end_ns,
            self.settled,
            self._work_ns // NS,
        )

    def snapshot(self, top: int | None = 8) -> StatsSnapshot:
        stats, now = self._shown
        return stats.snapshot(now, top=top)

    def vcpu_snapshot(self, vcpu: int, top: int | None = 10) -> VcpuSnapshot | None:
        stats, now = self._shown
        return stats.vcpu_snapshot(vcpu, now, top=top)

    @property
    def stats(self) -> ExitStats:
        return self._shown[0]

    def now_ns(self) -> int:
        """The recording time the aggregate on show has reached."""
        return self._shown[1]

    @property
    def settled(self) -> bool:
        """True when the aggregate on show is at the clock's position."""
        with self._lock:
            return self._caught_up(self._position(time.monotonic()))

    def _caught_up(self, target: int) -> bool:
        """Called with the lock held."""
        if self._rebuild or self._rebuilding or self._goal is not None:
            return False
        return self._work_ns >= target

    def wait_settled(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.settled:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.005)
        return True

    def status(self) -> SourceStatus:
        meta = self.recording.meta
        with self._lock:
            target = self._position(time.monotonic())
            busy = self._rebuild or self._rebuilding or self._goal is not None
            done = self._work_ns
        shown = self._shown[1]
        if busy or target - shown > NS // 2:
            if self._goal is not None:
                state = f"seeking: read {(done - self.start_ns) / NS:.0f} s"
            else:
                span = max(1, target - self.start_ns)
                state = f"seeking {min(99, 100 * max(0, done - self.start_ns) // span)}%"
        elif self.end_ns is not None and shown >= self.end_ns:
            state = "replay ended" + (", truncated" if self.truncated else "")
        elif self.paused:
            state = f"paused at {self.speed:g}x"
        else:
            state = f"replay {self.speed:g}x"
        end = self.end_ns if self.end_ns is not None else self._marked_end_ns
        length = None if end is None else (end - self.start_ns) / NS
        return SourceStatus(
            title=f"{self.path}: pid {meta.pid}  {command_line(meta.argv)}",
            state=state,
            since_s=(shown - self.start_ns) / NS,
            live=False,
            length_s=length,
            busy=state.startswith("seeking"),
            exits=self._shown[0].total,
            clock=(self.start_ns, meta.start_wall),
        )

    @property
    def truncated(self) -> bool:
        """The recording has no end marker (cut short by a crash, or still being written)."""
        return not (self.recording.complete if self.end_ns is not None else self._ends_whole)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(5.0)

    # --- the player thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closing:
                        return
                    target = self._position(time.monotonic())
                    if self._rebuild:
                        self._rebuild = False
                        self._rebuilding = True
                        self._work = self._new_stats()
                        self._work_ns = self.start_ns
                        self._batches = self.recording.batches(BATCH)
                        self._pending = None
                    at_end = self.end_ns is not None and target >= self.end_ns
                    # playing: feed once a tick; at the end (or paused), all the way to it
                    slack = 0 if self.paused or at_end else int(TICK_S * NS * self.speed)
                    if not self._caught_up(target - slack):
                        break
                    at_rest = self.paused or at_end
                    self._lock.wait(None if at_rest else TICK_S)
                if self._goal is not None:
                    target = END_OF_TIME
            finished = self._feed_one(self._work, target)
            with self._lock:
                if self._rebuild:
                    continue  # a newer seek came: start on that one
                if finished or not self._rebuilding:
                    self._shown = (self._work, self._work_ns)
                    self._rebuilding = self._rebuilding and not finished
                if finished and self._goal is not None and self.end_ns is not None:
                    goal, self._goal = self._goal, None
                    self._set_clock(self.start_ns + int((self.end_ns - self.start_ns) * goal))

    def _feed_one(self, stats: ExitStats, target_ns: int) -> bool:
        """Feed at most one batch up to ``target_ns``; True once nothing before it is left."""
        batch = self._pending
        if batch is None:
            batch = next(self._batches, None)
            if batch is None:
                end = self._work_ns
                if self.recording.end is not None:
                    end = max(end, self.recording.end.t_ns)
                self.end_ns = end
                self._work_ns = max(self._work_ns, min(target_ns, end))
                return True
            self._stops = StopShare(batch.stops, batch.exits)
        last = batch.last_exit_ns
        if last is not None and last > target_ns:
            records, base = batch.records, batch.base_ns
            cut = cut_after(records, target_ns - base)  # at an exit: its LONG/DATA go with it
            before, after = split_coalesced(batch.coalesced, target_ns - base)
            self._add_by_second(
                stats, ExitBatch(records[:cut], base, batch.vcpus, coalesced=before)
            )
            # losses were counted up to the batch's end: they stay with its last exit
            self._pending = ExitBatch(records[cut:], base, (), batch.lost, coalesced=after)
            self._work_ns = target_ns
            return True
        self._add_by_second(stats, batch)
        self._pending = None
        if last is not None:
            self._work_ns = max(self._work_ns, last)
        return False

    def _add_by_second(self, stats: ExitStats, part: ExitBatch) -> None:
        """Add ``part`` a second of its exits at a time, each with its share of the stops its
        batch counted: a file's batch spans seconds (4,096 exits), and its stops all at its
        last exit would show 0 stops/s while it plays and a burst at its end."""
        records, base, vcpus = part.records, part.base_ns, part.vcpus
        coalesced = part.coalesced
        while (first := first_t_exit(records)) is not None:
            second_end = (base + first) // NS * NS + NS - 1
            cut = cut_after(records, second_end - base)
            piece, records = records[:cut], records[cut:]
            stops = self._stops.take(exit_count(piece))
            now, coalesced = split_coalesced(coalesced, second_end - base)
            stats.add_batch(ExitBatch(piece, base, vcpus, 0 if records else part.lost, stops,
                                      coalesced=now))  # fmt: skip
            vcpus = ()
        if not part.records:  # no exits: only vCPUs seen, losses or stops
            stats.add_batch(ExitBatch(b"", base, vcpus, part.lost, self._stops.take(0),
                                      coalesced=coalesced))  # fmt: skip
        elif coalesced:  # seen after the part's last exit
            stats.add_batch(ExitBatch(b"", base, coalesced=coalesced))
