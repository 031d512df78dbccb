"""Which process wrote a line, and whether it still runs: host, pid and the pid's start time.

A pid alone is reused by the kernel once its process has ended; the start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) tells a new process with the same pid apart.
Where ``/proc`` is missing (macOS, Windows) the start time is None and the pid alone is
compared. A process on another host cannot be looked at: :func:`process_gone` says False
(unknown), never True.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

_MAX_HOST_CHARS = 255


@dataclass(frozen=True)
class ProcessIdentity:
    """A process: ``host`` (``socket.gethostname()``), ``pid``, ``started`` (clock ticks since boot, or None)."""

    host: str
    pid: int
    started: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (a journal line's field)."""
        return {"host": self.host, "pid": self.pid, "started": self.started}

    @classmethod
    def from_dict(cls, value: Any) -> ProcessIdentity:
        """Validate a JSON field read from disk.

        Raises:
            ValueError: not an object of a host (text, at most 255 characters), a positive
                pid and a non-negative start time or null.
        """
        if not isinstance(value, dict):
            raise ValueError("process: not an object")
        host, pid, started = value.get("host"), value.get("pid"), value.get("started")
        if not isinstance(host, str) or not host or len(host) > _MAX_HOST_CHARS or "\x00" in host:
            raise ValueError("process.host")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
            raise ValueError("process.pid")
        if started is not None and (not isinstance(started, int) or isinstance(started, bool) or not 0 <= started < 2**63):
            raise ValueError("process.started")
        return cls(host=host, pid=pid, started=started)


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start ticks)`` of ``pid`` from ``/proc/<pid>/stat`` (fields 3 and 22), or None."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read(4096)
        # the command name (field 2) is in parentheses and may hold spaces: split after its last ")"
        fields = stat[stat.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    stat = _stat(pid)
    return stat[1] if stat is not None else None


def this_process() -> ProcessIdentity:
    """The calling process."""
    return ProcessIdentity(host=socket.gethostname(), pid=os.getpid(), started=start_ticks(os.getpid()))


def process_gone(process: ProcessIdentity) -> bool:
    """Whether ``process`` ran on this host and has ended.

    Ended: its pid is free, a zombie, or reused by a process that started at another time.
    False while it runs, or when it ran on another host (unknown).
    """
    if process.host != socket.gethostname():
        return False
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, owned by another user
        pass
    except OSError:
        return False
    stat = _stat(process.pid)
    if stat is None:
        return False
    state, started = stat
    if state in ("Z", "X"):  # ended, not yet reaped by its parent
        return True
    return process.started is not None and started != process.started


__all__ = ["ProcessIdentity", "process_gone", "start_ticks", "this_process"]
