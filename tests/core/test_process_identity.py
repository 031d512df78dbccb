"""Whether the process that wrote a line still runs: host, pid and the pid's start time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from uma_callbacks.core.process_identity import ProcessIdentity, process_gone, start_ticks, this_process


def test_this_process_runs_and_round_trips_through_json():
    me = this_process()
    assert me.host == socket.gethostname() and me.pid == os.getpid()
    assert ProcessIdentity.from_dict(me.as_dict()) == me
    assert not process_gone(me)


def test_an_ended_process_is_gone_whether_reaped_or_a_zombie():
    reaped = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    assert process_gone(ProcessIdentity(socket.gethostname(), int(reaped.stdout)))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    started = start_ticks(zombie.pid)
    try:
        while True:  # ended, not yet waited for
            with open(f"/proc/{zombie.pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        assert process_gone(ProcessIdentity(socket.gethostname(), zombie.pid, started))
    finally:
        zombie.wait()


def test_a_reused_pid_is_told_apart_by_its_start_time():
    me = this_process()
    assert me.started is not None
    assert process_gone(ProcessIdentity(me.host, me.pid, me.started + 1))


def test_a_process_on_another_host_is_never_called_gone():
    assert not process_gone(ProcessIdentity(socket.gethostname() + "-elsewhere", 2**31 - 2))


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        {"host": "", "pid": 1},
        {"host": "h" * 256, "pid": 1},
        {"host": "a\x00b", "pid": 1},
        {"host": "h", "pid": 0},
        {"host": "h", "pid": True},
        {"host": "h", "pid": 2**31},
        {"host": "h", "pid": "12"},
        {"host": "h", "pid": 1, "started": -1},
        {"host": "h", "pid": 1, "started": 1.5},
    ],
)
def test_a_field_read_from_disk_is_validated(value):
    with pytest.raises(ValueError, match="process"):
        ProcessIdentity.from_dict(value)
