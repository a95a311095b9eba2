"""One exception family, each carrying a message written for the user."""

from __future__ import annotations


class KvmtopError(Exception):
    """Something the user can act on. The CLI prints ``kvmtop: <message>`` and exits with
    ``exit_code``; the TUI shows the message as a notification."""

    exit_code = 1


class UsageError(KvmtopError):
    exit_code = 2


class NoSuchProcess(KvmtopError):
    exit_code = 3


class NotKvmProcess(KvmtopError):
    exit_code = 4


class PermissionDenied(KvmtopError):
    exit_code = 5


class CommandNotFound(KvmtopError):
    exit_code = 127


class RecordingError(KvmtopError):
    """Unreadable, corrupt or truncated recording file."""

    exit_code = 6


class OutputError(KvmtopError):
    """An export or stream cannot be written (no such directory, permission, disk full)."""

    exit_code = 8


class KvmUnavailable(KvmtopError):
    """/dev/kvm is missing or cannot be opened (the demo needs it)."""

    exit_code = 7


class NoTerminal(KvmtopError):
    """The TUI was asked for with stdin or stdout not a terminal (a pipe, a file, /dev/null)."""

    exit_code = 9


ERRORS_BY_NAME: dict[str, type[KvmtopError]] = {
    cls.__name__: cls
    for cls in (
        KvmtopError,
        UsageError,
        NoSuchProcess,
        NotKvmProcess,
        PermissionDenied,
        CommandNotFound,
        RecordingError,
        KvmUnavailable,
        OutputError,
        NoTerminal,
    )
}
