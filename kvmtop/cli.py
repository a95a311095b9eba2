"""The command line: parse arguments, run one thin command, map errors to one line and an exit
code. Tracebacks only with ``--debug``.

    kvmtop                         the TUI: pick a KVM process
    kvmtop -p PID                  the TUI, attached to PID (-d S: refresh every S seconds)
    kvmtop -- CMD [ARGS...]        the TUI, CMD launched under trace
    kvmtop demo                    the TUI on a small built-in guest
    kvmtop replay FILE             the TUI playing a recording
    kvmtop record -p PID [-o FILE] [--duration S] [--data]
    kvmtop record [-o FILE] [--data] -- CMD [ARGS...]
    kvmtop record ... --jsonl -    ... and one JSON line per exit to stdout
    kvmtop report FILE [--json | --csv]
    kvmtop diff A B [--json] [--threshold PCT] [--min-count N]
    kvmtop export FILE --perfetto OUT.json | --csv OUT | --jsonl OUT     (OUT may be -)
    kvmtop list [--json]
    kvmtop stats -p PID [--interval S] [--count N] [--json]
    kvmtop watch -p PID [--rate HZ] [--interval S] [--count N] [--json] [--rip [--guest-symbols F]]
    kvmtop exporter [--listen HOST:PORT] [--rescan S] [--sampled [HZ]] [-p PID] [--vm NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn, TextIO

from kvmtop import __version__
from kvmtop.errors import KvmtopError, OutputError, RecordingError, UsageError
from kvmtop.trace.engine import ENGINE_ENV, ENGINES
from kvmtop.units import command_text, ended_text

if TYPE_CHECKING:
    from kvmtop.formats.recording import Recording
    from kvmtop.model.messages import ExitBatch

DEFAULT_RECORDING = "kvmtop.data"
# A stop signal ends `record` within this: the detach it begins, or else the trace is cut short
# (the kernel detaches a VMM when kvmtop exits; a launched command under the filter ends with it)
STOP_GRACE_S = 0.5
DELAY_MIN_S, DELAY_MAX_S = 0.25, 5.0  # the TUI's refresh steps (kvmtop.screens.polled)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")  # a command's own: kvmtop record

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if message:  # argparse's own ignores a failed write (--help into a full disk)
            (file or sys.stderr).write(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmtop",
        description="top for KVM exits: why, how often and for how long each vCPU leaves the guest",
        epilog="Run `kvmtop -- CMD ...` or `kvmtop record -- CMD ...` to start CMD under trace.",
    )
    parser.add_argument("--version", action="version", version=f"kvmtop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-p", "--pid", type=int, action="append",
                        help="attach to this VMM process (again for several)")  # fmt: skip
    parser.add_argument("-o", "--output", help="also record to this file (TUI)")
    parser.add_argument("-a", "--all", action="store_true",
                        help="the TUI on every VMM of the host, those started later too "
                        "(the tracepoint engine)")  # fmt: skip
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="how exits are seen: auto (KVM's tracepoints where kvmtop may "
                        "open them, else ptrace), tracepoints, or ptrace")  # fmt: skip
    parser.add_argument("--rip", action="store_true",
                        help="also the guest's RIP at every exit (ptrace: sets the vCPUs' "
                        "kvm_valid_regs while traced; tracepoints: adds kvm_emulate_insn; see "
                        "the README)")  # fmt: skip
    parser.add_argument("--guest-symbols", metavar="FILE",
                        help="name guest RIPs with a guest's kallsyms copy, System.map or ELF")  # fmt: skip
    parser.add_argument("-d", "--delay", type=float, metavar="S",
                        help="refresh the TUI's views every S seconds, 0.25 to 5 (0.25; + and - "
                        "change it)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    rec = sub.add_parser("record", help="record every KVM exit of a VMM, then print a summary")
    # SUPPRESS: `kvmtop -p PID record` and `kvmtop -o F demo` keep what was given before the
    # command (a subcommand's default would overwrite it)
    rec.add_argument("-p", "--pid", type=int, action="append", default=argparse.SUPPRESS,
                     help="attach to this running VMM (again for several)")  # fmt: skip
    rec.add_argument("-o", "--output", default=argparse.SUPPRESS,
                     help=f"recording file ({DEFAULT_RECORDING}; none with --jsonl)")  # fmt: skip
    rec.add_argument(
        "--jsonl",
        metavar="OUT",
        help="also stream one JSON line per exit to OUT (- is stdout; the summary then goes to "
        "stderr); no recording file unless -o is given",
    )
    rec.add_argument("-a", "--all", action="store_true", default=argparse.SUPPRESS,
                     help="every VMM on the host, those started later too (tracepoints)")  # fmt: skip
    rec.add_argument("--engine", choices=ENGINES, default=argparse.SUPPRESS,
                     help="auto (the default), tracepoints or ptrace")  # fmt: skip
    rec.add_argument("--duration", type=float, help="stop after this many seconds")
    rec.add_argument("--rip", action="store_true", default=argparse.SUPPRESS,
                     help="also record the guest's RIP at every exit (see the README)")  # fmt: skip
    rec.add_argument("--guest-symbols", metavar="FILE", default=argparse.SUPPRESS,
                     help="name guest RIPs in the summary with a guest's kallsyms, System.map or "
                     "ELF")  # fmt: skip
    rec.add_argument(
        "--data", action="store_true", help="also record IO/MMIO data values (may hold secrets)"
    )
    rec.add_argument("--json", action="store_true", help="print the summary as JSON")
    rec.add_argument(
        "--no-seccomp",
        action="store_true",
        help="launch mode: trace without kvmtop's seccomp filter (2 stops per exit, but CMD can "
        "outlive the recording)",
    )
    rec.add_argument(
        "--no-notify",
        action="store_true",
        help="launch mode: a seccomp filter that stops the tracer (1 ptrace stop per exit) "
        "rather than one that notifies kvmtop's listener (none)",
    )

    rep = sub.add_parser("report", help="summarise a recording")
    rep.add_argument("file")
    rep_form = rep.add_mutually_exclusive_group()
    rep_form.add_argument("--json", action="store_true", help="print JSON")
    rep_form.add_argument("--csv", action="store_true", help="print the table as CSV")
    rep.add_argument("--guest-symbols", metavar="FILE", default=argparse.SUPPRESS,
                     help="name guest RIPs with a guest's kallsyms copy, System.map or ELF")  # fmt: skip

    dif = sub.add_parser("diff", help="two recordings side by side: what changed from A to B")
    dif.add_argument("a", metavar="A", help="the recording compared against (the baseline)")
    dif.add_argument("b", metavar="B", help="the recording compared")
    dif.add_argument("--json", action="store_true", help="print JSON")
    dif.add_argument("--threshold", type=float, metavar="PCT",
                     help="exit 1 when a rate or p99 moved by more than PCT percent")  # fmt: skip
    dif.add_argument("--min-count", type=int, default=None, metavar="N",
                     help="rows of fewer exits (in A and in B) do not count for --threshold; "
                     "p99s count where both have N (100)")  # fmt: skip

    exp = sub.add_parser("export", help="convert a recording for other tools (- is stdout)")
    exp.add_argument("file")
    exp_form = exp.add_mutually_exclusive_group(required=True)
    exp_form.add_argument("--perfetto", metavar="OUT", help="Chrome JSON trace (ui.perfetto.dev)")
    exp_form.add_argument("--csv", metavar="OUT", help="CSV, one row per exit")
    exp_form.add_argument("--jsonl", metavar="OUT", help="JSON Lines, one object per exit")
    exp.add_argument("--rate-bin", type=float, default=10.0, metavar="MS",
                     help="Perfetto: the exit-rate counter's bin (10 ms)")  # fmt: skip
    exp.add_argument("--guest-symbols", metavar="FILE", default=argparse.SUPPRESS,
                     help="name guest RIPs with a guest's kallsyms copy, System.map or ELF")  # fmt: skip

    lst = sub.add_parser("list", help="list the KVM processes on this machine")
    lst.add_argument("--json", action="store_true", help="print JSON")

    sts = sub.add_parser("stats", help="KVM's own counters of a VM, live (attaches only briefly)")
    sts.add_argument("-p", "--pid", type=int, required=True, help="the VMM's pid")
    sts.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    sts.add_argument("--count", type=int, help="stop after N samples (1 or more)")
    sts.add_argument("--json", action="store_true", help="one JSON object per sample")

    wat = sub.add_parser(
        "watch", help="where each vCPU's time goes, sampled: the VMM is not traced"
    )
    wat.add_argument("-p", "--pid", type=int, required=True, help="the VMM's pid")
    wat.add_argument("--rate", type=float, default=1000.0, metavar="HZ",
                     help="looks at each vCPU per second (1000; at most 100000)")  # fmt: skip
    wat.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    wat.add_argument("--count", type=int, help="stop after N reports (1 or more)")
    wat.add_argument("--json", action="store_true", help="one JSON object per report")
    wat.add_argument("--rip", action="store_true", default=argparse.SUPPRESS,
                     help="also the guest code the VMM's exits come from, sampled (sets the "
                     "vCPUs' kvm_valid_regs while watching: see the README)")  # fmt: skip
    wat.add_argument("--guest-symbols", metavar="FILE", default=argparse.SUPPRESS,
                     help="name guest RIPs with a guest's kallsyms copy, System.map or ELF")  # fmt: skip

    prom = sub.add_parser("exporter", help="serve KVM's counters of every VM here to Prometheus")
    prom.add_argument("--listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                      help="where to serve /metrics (127.0.0.1:9464; port 0: any free one)")  # fmt: skip
    prom.add_argument("--rescan", type=float, default=10.0, metavar="S",
                      help="look for new VMs every S seconds (10)")  # fmt: skip
    prom.add_argument("-p", "--pid", type=int, action="append", default=[],
                      help="read only this VMM (again for more); default: every VM on the host")  # fmt: skip
    prom.add_argument("--vm", action="append", default=[], metavar="NAME",
                      help="read only the VMs of this name (QEMU's -name, as `kvmtop list` "
                      "shows it; again for more), and those of --pid")  # fmt: skip
    prom.add_argument("--sampled", type=float, nargs="?", const=100.0, default=None, metavar="HZ",
                      help="also export each vCPU's time in the VMM by exit reason, sampled HZ "
                      "times a second per vCPU (100) without tracing (see kvmtop watch)")  # fmt: skip

    rpl = sub.add_parser("replay", help="play a recording in the TUI")
    rpl.add_argument("--guest-symbols", metavar="FILE", default=argparse.SUPPRESS,
                     help="name guest RIPs with a guest's kallsyms copy, System.map or ELF")  # fmt: skip
    rpl.add_argument("file")

    demo = sub.add_parser("demo", help="start a small built-in guest and watch it (needs /dev/kvm)")
    demo.add_argument("--rip", action="store_true", default=argparse.SUPPRESS,
                      help="also the guest's RIP at every exit")  # fmt: skip
    demo.add_argument("-o", "--output", default=argparse.SUPPRESS, help="also record to this file")
    parser.set_defaults(commands=sub.choices)  # each command's parser, for its usage errors
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in args_in:
        i = args_in.index("--")
        args_in, command = args_in[:i], args_in[i + 1 :]
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(args_in)
        if extra:  # told by the command's parser: its --help lists its options
            parser = args.commands.get(args.command, parser)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        print(f"kvmtop: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `--help | head`
        _silence_stdout()
        return 0
    except OSError as exc:  # --help that stdout cannot take
        _silence_stdout()
        print(f"kvmtop: cannot write to stdout: {exc.strerror or exc}", file=sys.stderr)
        return OutputError.exit_code
    if args.command in (None, "record", "demo"):  # the commands that trace
        from kvmtop.native import missing_notice

        notice = missing_notice()
        if notice:
            print(notice, file=sys.stderr)
    tui = args.command in (None, "demo", "replay")
    real_stdout = sys.stdout
    if not tui:
        sys.stdout = _CheckedStdout(real_stdout)  # type: ignore[assignment]
    try:
        status = _run(args, command)
        sys.stdout.flush()  # a full disk shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except KvmtopError as exc:
        if args.debug:
            raise
        print(f"kvmtop: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout = real_stdout


class _CheckedStdout:
    """stdout for the commands that print: a write that fails (a full disk, an I/O error) is an
    OutputError, one line; a closed pipe stays a BrokenPipeError, which ends quietly."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def _guard(self, call: Callable[..., Any], *args: object) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write to stdout: {exc.strerror or exc}") from None

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding...
        return getattr(self._stream, name)


def _run(args: argparse.Namespace, command: list[str] | None) -> int:
    if command is not None and not command:
        raise UsageError("no command after --")
    if getattr(args, "engine", None):
        os.environ[ENGINE_ENV] = args.engine  # every tracer this run opens, the TUI's too
    if args.command == "record":
        given = (args.pid is not None) + (command is not None) + bool(args.all)
        if given > 1:
            raise UsageError("record takes -p PID or -- CMD [ARGS...] (or -a), not both")
        if not given:
            raise UsageError("record needs either -p PID or -- CMD [ARGS...] (or -a, every VMM)")
        output = args.output or (None if args.jsonl else DEFAULT_RECORDING)
        return record(args.pid, command, output, args.duration, args.data, args.json,
                      not args.no_seccomp, args.jsonl, notify=not args.no_notify,
                      all_vms=args.all, rip=args.rip, symbols=args.guest_symbols)  # fmt: skip
    if command is not None and args.command is not None:
        raise UsageError(f"`--` goes with record or the TUI, not with {args.command}")
    if args.command == "report":
        return report(args.file, "json" if args.json else "csv" if args.csv else "table",
                      args.guest_symbols)  # fmt: skip
    if args.command == "diff":
        return diff(args)
    if args.command == "export":
        return export(args)
    if args.command == "list":
        return list_processes(args.json)
    if args.command == "exporter":
        return exporter(args.listen, args.rescan, args.sampled, args.pid, args.vm)
    if args.command == "watch":
        return watch(args)
    from kvmtop.app import run_tui  # Textual loads only for the TUI

    if args.command == "stats":
        from kvmtop.commands.stats import run_stats

        if args.interval <= 0:
            raise UsageError("--interval must be above 0")
        if args.count is not None and args.count < 1:
            raise UsageError("--count must be 1 or more (leave it out to run until Ctrl-C)")
        try:
            return run_stats(args.pid, args.interval, args.json, args.count, sys.stdout)
        except BrokenPipeError:  # `| head`: the reader has all it wanted
            _silence_stdout()
            return 0
    if args.delay is not None and not DELAY_MIN_S <= args.delay <= DELAY_MAX_S:
        raise UsageError(f"--delay must be from {DELAY_MIN_S:g} to {DELAY_MAX_S:g} seconds, as + and - "
                         f"set it (not {args.delay:g})")  # fmt: skip
    symbols = guest_symbols(args.guest_symbols)
    if args.command == "replay":
        return run_tui(replay=args.file, refresh_s=args.delay, guest_symbols=symbols)
    if args.command == "demo":
        return run_tui(demo=True, record_path=args.output, refresh_s=args.delay, rip=args.rip,
                       guest_symbols=symbols)  # fmt: skip
    if args.all and (args.pid or command is not None):
        raise UsageError("-a takes no -p PID and no -- CMD: it is every VMM on the host")
    return run_tui(pids=args.pid, argv=command, record_path=args.output, refresh_s=args.delay,
                   all_vms=args.all, rip=args.rip, guest_symbols=symbols)  # fmt: skip


def watch(args: argparse.Namespace) -> int:
    from kvmtop.commands.watch import run_watch

    if args.interval <= 0:
        raise UsageError("--interval must be above 0")
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be 1 or more (leave it out to run until Ctrl-C)")
    if not 0 < args.rate <= 100_000:
        raise UsageError("--rate must be above 0 and at most 100000")
    if args.guest_symbols and not args.rip:
        raise UsageError("--guest-symbols names the guest code --rip samples: give --rip too")
    symbols = guest_symbols(args.guest_symbols)
    try:
        return run_watch(args.pid, args.rate, args.interval, args.count, args.json, sys.stdout,
                         sys.stderr, args.rip, symbols)  # fmt: skip
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        _silence_stdout()
        return 0


def record(
    pids: list[int] | None,
    command: list[str] | None,
    output: str | None,
    duration: float | None,
    with_data: bool,
    as_json: bool,
    one_stop: bool = True,
    jsonl: str | None = None,
    notify: bool = True,
    all_vms: bool = False,
    rip: bool = False,
    symbols: str | None = None,
) -> int:
    """Trace until the VMM exits, Ctrl-C/SIGTERM, ``duration``, or the JSONL reader going away;
    then summarise. A launched command runs under kvmtop's seccomp filter unless ``one_stop`` is
    False."""
    from kvmtop.formats.jsonl_csv import JsonlStream
    from kvmtop.formats.recording import tracing_mode
    from kvmtop.formats.report import summary_json, summary_table
    from kvmtop.sources.session import SessionState, TraceSession

    to_stdout = jsonl == "-"
    symbols_found = guest_symbols(symbols)
    stream = JsonlStream(jsonl, symbols_found) if jsonl is not None else None
    from kvmtop.tracer_thread import choose_engine

    if all_vms and choose_engine()[0] != "tracepoints":
        raise UsageError("-a needs the tracepoint engine: " + choose_engine()[1])
    session = TraceSession(record_path=output, with_data=with_data,
                           keep_old=output == DEFAULT_RECORDING, exit_sink=stream,
                           child_stdout_to_stderr=to_stdout, rip=rip)  # fmt: skip
    # CMD's stdout stays its own (as with perf stat, strace -c, time); -p: the summary is the output
    summary_out = sys.stderr if to_stdout or command is not None else sys.stdout
    reader_gone = False
    stop_requested: list[float] = []  # when each stop signal came
    notices: list[tuple[str, str]] = []  # errors, for the end; warnings are said at once

    def on_signal(_signum: int, _frame: object) -> None:
        stop_requested.append(time.monotonic())
        session.detach()

    def stop_overdue() -> bool:
        """A stop signal came and the detach it began has not ended the trace in time (or a
        second signal came): stop waiting for it."""
        return bool(stop_requested) and (
            len(stop_requested) > 1 or time.monotonic() - stop_requested[0] > STOP_GRACE_S
        )

    # SIGHUP: the terminal went away; detach cleanly and finish the file all the same.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in stop_signals}
    try:
        if pids:
            from kvmtop.host.procfs import is_stopped

            for pid in pids:
                if is_stopped(pid):
                    print(f"kvmtop: pid {pid} is stopped (SIGSTOP): it makes no exit until "
                          f"`kill -CONT {pid}`; recording all the same", file=sys.stderr)  # fmt: skip
            session.attach(*pids)
        elif all_vms:
            session.attach()
        else:
            session.launch(command or [], one_stop=one_stop, notify=notify)
        attached = session.wait_attached()
        what = command_text(attached.argv, 60) or str(attached.pid)
        verb = "launched" if attached.launched else "attached to"
        others = [str(p) for p in attached.pids[1:]]
        also = f" and {', '.join(others)}" if others else ""
        dests = [output, "stdout (JSONL)" if to_stdout else jsonl and f"{jsonl} (JSONL)"]
        where = " and ".join(d for d in dests if d)
        print(
            f"kvmtop: {verb} pid {attached.pid} ({what}){also}; recording to {where}; Ctrl-C stops",
            file=sys.stderr,
        )
        if attached.engine_note:
            print(f"kvmtop: {attached.engine_note}", file=sys.stderr)
            if session.hardware_note:
                print(f"kvmtop: {session.hardware_note}", file=sys.stderr)
        elif attached.one_stop:
            how = "no ptrace stop per exit (seccomp user notification)" if attached.notify else (
                "one stop per exit (seccomp filter)")  # fmt: skip
            print(
                f"kvmtop: {how}: times per run include the VMM's handling, and the command "
                "ends when the recording does",
                file=sys.stderr,
            )
        elif attached.launched and one_stop and not attached.engine_note:
            print(
                "kvmtop: the seccomp filter could not be installed: 2 stops per exit",
                file=sys.stderr,
            )
        deadline = None if duration is None else time.monotonic() + duration
        while not session.ended.wait(0.05) and not stop_overdue():
            notices += say_warnings(session.take_notices())
            if deadline is not None and time.monotonic() >= deadline:
                session.detach()
                deadline = None
            if to_stdout and not reader_gone and _stdout_reader_gone():
                reader_gone = True  # also seen while the guest makes no exits
                session.detach()
        if session.launched and session.exit_status is None and not stop_overdue():
            # Detached from a command we started: it is still our child; wait for it to end
            # (a stop signal ends the wait: it runs on).
            if not stop_requested:
                print(f"kvmtop: detached; waiting for pid {session.pid} to exit", file=sys.stderr)
            while not session.child_ended.wait(0.05) and not stop_overdue():
                pass
    finally:
        session.close(timeout=0.1 if stop_requested else 2.0)
        if stream is not None:
            stream.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if to_stdout and (reader_gone or session.sink_closed):
        _silence_stdout()
        print("kvmtop: the JSONL reader closed its pipe; detached", file=sys.stderr)
    notices += say_warnings(session.take_notices())
    errors = [text for severity, text in notices if severity == "error"]
    if session.state is SessionState.FAILED:
        raise KvmtopError(errors[-1] if errors else "attach failed")
    for text in errors:  # e.g. the recording could not be written; the summary still follows
        print(f"kvmtop: {text}", file=sys.stderr)
    if session.exit_status is not None:
        print(f"kvmtop: pid {session.pid} {ended_text(session.exit_status)}", file=sys.stderr)
    snapshot = session.stats.snapshot(top=None)
    meta = {"pid": session.pid, "argv": list(session.argv), "file": output,
            "launched": session.launched, "one_stop": session.one_stop,
            "mode": session.engine_note or tracing_mode(
                session.launched, session.one_stop, session.notify, session.filter_note),
            "traced_s": session.traced_s}  # fmt: skip
    if as_json:
        print(json.dumps(summary_json(snapshot, meta, symbols_found), indent=2), file=summary_out)
    else:
        print(summary_table(snapshot, meta, symbols_found), file=summary_out)
    if session.output_error is not None:
        return session.output_error.exit_code
    if session.launched:
        status = session.child_exit_status
        return status if status is not None else 0
    return 0


def say_warnings(notices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Print the warnings among ``notices`` on stderr; the others, for later."""
    for severity, text in notices:
        if severity == "warning":
            print(f"kvmtop: {text}", file=sys.stderr)
    return [(severity, text) for severity, text in notices if severity != "warning"]


def guest_symbols(path: str | None) -> Any:
    """The guest symbols of ``--guest-symbols FILE`` (None without it); a bad file is a
    UsageError, said before anything else is done."""
    if path is None:
        return None
    from kvmtop.formats.guest_symbols import load_guest_symbols

    return load_guest_symbols(path)


def report(path: str, form: str, symbols_path: str | None = None) -> int:
    from kvmtop.formats.report import (
        load_recording_stats,
        summary_csv,
        summary_json,
        summary_table,
        traced_s,
    )

    symbols = guest_symbols(symbols_path)
    recording, stats = load_recording_stats(path)
    meta = recording.meta_dict() | {"traced_s": traced_s(recording, stats)}
    snapshot = stats.snapshot(top=None)
    try:
        if form == "json":
            print(json.dumps(summary_json(snapshot, meta, symbols), indent=2))
        elif form == "csv":
            print(summary_csv(snapshot, meta), end="")
        else:
            print(summary_table(snapshot, meta, symbols))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wanted; a truncation is still said
        _silence_stdout()
    _check_complete(recording, f"the report covers the {snapshot.total} exits it holds")
    return 0


def diff(args: argparse.Namespace) -> int:
    """Two recordings side by side; with --threshold, 1 when something moved too far."""
    from kvmtop.formats.diff import MIN_COUNT, diff_json, diff_snapshots, diff_table, moved_rows
    from kvmtop.formats.report import load_recording_stats, seconds_text, traced_s

    if args.threshold is not None and not args.threshold >= 0:
        raise UsageError("--threshold takes a percentage of 0 or more")
    min_count = MIN_COUNT if args.min_count is None else args.min_count
    if min_count < 1:
        raise UsageError("--min-count must be 1 or more")
    loaded = []
    for path in (args.a, args.b):
        recording, stats = load_recording_stats(path)
        snapshot = stats.snapshot(top=None)
        loaded.append((recording, snapshot, traced_s(recording, stats) or 0.0))
    (rec_a, snap_a, sec_a), (rec_b, snap_b, sec_b) = loaded
    rows = diff_snapshots(snap_a, sec_a, snap_b, sec_b, min_count)
    if args.json:
        recordings = {name: {"file": rec.path, "exits": snap.total, "duration_s": round(sec, 6)}
                      for name, (rec, snap, sec) in zip("ab", loaded, strict=True)}  # fmt: skip
        print(json.dumps(diff_json(rows, recordings, args.threshold, min_count), indent=2))
    else:
        heads = tuple(f"{rec.path}  {snap.total} exits in {seconds_text(sec)}"
                      for rec, snap, sec in loaded)  # fmt: skip
        print(diff_table(rows, (heads[0], heads[1]), args.threshold, min_count), end="")
    for rec, snap, _sec in loaded:
        _check_complete(rec, f"the diff covers the {snap.total} exits it holds")
    if args.threshold is not None and moved_rows(rows, args.threshold, min_count):
        return 1
    return 0


def _check_complete(recording: Recording, covered: str) -> None:
    if not recording.complete:
        torn = ", torn last record" if recording.torn_bytes else ""
        raise RecordingError(f"{recording.path} is truncated (no end marker{torn}): {covered}")


def export(args: argparse.Namespace) -> int:
    """Stream a recording into another format: nothing is held but a little per vCPU."""
    from kvmtop.formats.jsonl_csv import csv_chunks, jsonl_chunks, open_output, write_chunks
    from kvmtop.formats.perfetto import PerfettoTrace

    if args.rate_bin <= 0:
        raise UsageError("--rate-bin takes a number of milliseconds above 0")
    from kvmtop.formats.recording import open_recording

    symbols = guest_symbols(args.guest_symbols)
    recording = open_recording(args.file)
    start = recording.meta.start_ns
    total = [0]

    def counted() -> Iterator[ExitBatch]:
        for batch in recording.batches():
            total[0] += batch.exits
            yield batch

    dest = args.perfetto or args.csv or args.jsonl
    if dest != "-" and os.path.exists(dest) and os.path.samefile(dest, args.file):
        raise OutputError(f"cannot write {dest}: it is the recording being exported")
    if args.perfetto:
        chunks = PerfettoTrace(recording.meta, int(args.rate_bin * 1e6), symbols).chunks(counted())
    elif args.csv:
        chunks = csv_chunks(counted(), start, symbols)
    else:
        chunks = jsonl_chunks(counted(), start, symbols)
    out = open_output(dest)
    try:
        write_chunks(chunks, out, dest)
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except KvmtopError:
        if out is not sys.stdout and os.path.isfile(dest):
            os.unlink(dest)  # not a file to open later, half-written
        raise
    finally:
        if out is not sys.stdout:
            out.close()
    _check_complete(recording, f"exported the {total[0]} exits it holds")
    return 0


def _stdout_reader_gone() -> bool:
    """A pipe's write end polls POLLERR once its reader has closed it (a file never does)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are reported unasked
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


def _silence_stdout() -> None:
    """After a closed pipe: send what is left for stdout to /dev/null, so that the interpreter's
    last flush does not fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def exporter(
    listen: str, rescan_s: float, sampled_hz: float | None = None, pids: Sequence[int] = (),
    names: Sequence[str] = (),
) -> int:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C, then close every fd and exit 0."""
    import threading

    from kvmtop.commands.exporter import VmChoice, run_exporter

    if rescan_s <= 0:
        raise UsageError("--rescan must be above 0")
    if sampled_hz is not None and not 0 < sampled_hz <= 100_000:
        raise UsageError("--sampled takes a rate above 0 and up to 100000 samples a second")
    stop = threading.Event()
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda _signum, _frame: stop.set()) for s in stop_signals}
    try:
        return run_exporter(listen, rescan_s, stop, sampled_hz,
                            VmChoice(frozenset(pids), frozenset(names)))  # fmt: skip
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


LIST_CPU_INTERVAL_S = 0.5  # `list --json` samples every process's CPU time this far apart


def list_processes(as_json: bool) -> int:
    from kvmtop.host.discovery import list_kvm_processes, not_yours, others_vmms

    procs = list_kvm_processes(cpu_interval=LIST_CPU_INTERVAL_S if as_json else 0.0)
    if as_json:
        print(json.dumps([p.as_dict() for p in procs], indent=2))
        return 0
    if not procs:
        others = others_vmms()
        print(f"no KVM processes of yours; {not_yours(others)}" if others else
              "no KVM processes found (run `kvmtop demo` to start a small one)")  # fmt: skip
        return 0
    print(f"{'PID':>7}  {'USER':<10} {'VCPUS':>5}  COMMAND")
    for p in procs:
        print(
            f"{p.pid:>7}  {p.user[:10]:<10} {p.vcpus:>5}  {p.name}  ({command_text(p.cmdline, 80)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
