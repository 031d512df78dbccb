"""The log folder of the Trainer's own ``TensorBoardCallback``, for the TensorBoard sink to join.

With ``report_to=["tensorboard"]`` the Trainer writes ``train/loss`` and the like into one
folder; ``UMACallback`` passes that folder to the TensorBoard sink (as the tracker run to join,
``{"tensorboard": {"run": folder}}``, as the Lightning trigger passes ``TensorBoardLogger.log_dir``),
so TensorBoard shows the ``uma.*`` cards in the same run. The folder is, as transformers picks it:

1. ``args.logging_dir`` when the arguments have one (transformers 4.x, where the callback
   writes there);
2. ``TENSORBOARD_LOGGING_DIR`` (transformers 5: read by the callback when it is built);
3. else transformers 5 names the folder ``<output_dir>/runs/<time>_<host>`` when training
   begins and keeps the name in its callback only. Report callbacks run before user callbacks,
   so at ``UMACallback.on_train_begin`` its writer has created its event file, named by
   TensorBoard ``events.out.tfevents.<time>.<host>.<pid>.<n>``: the folder is the one under
   ``<output_dir>/runs/`` (or one level deeper, a hyperparameter search's trial) that holds the
   newest event file of this host and process.

No folder found (no ``tensorboard`` in ``report_to``, or a writer the user gave that writes
elsewhere): ``None``, and the sink takes its default (``TENSORBOARD_LOGGING_DIR``, else
``<output_dir>/uma/tensorboard``).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

#: Entries of ``<output_dir>/runs`` looked at, at most (an old folder may hold many runs).
MAX_ENTRIES = 10_000
#: TensorBoard's event file name: ``events.out.tfevents.<time>.<host>.<pid>.<n>[suffix]``.
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(?P<time>\d+)\.(?P<host>.+)\.(?P<pid>\d+)\.(?P<n>\d+)$")


def trainer_tensorboard_dir(args: Any) -> str | None:
    """The absolute folder the Trainer's ``TensorBoardCallback`` writes to, or ``None`` (see the module docstring).

    Args:
        args: the Trainer's ``TrainingArguments`` (``report_to``, ``output_dir``, ``logging_dir``
            on transformers 4.x).

    Returns:
        The folder, or ``None`` when ``report_to`` names no TensorBoard or no folder is found.
    """
    report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
    if "tensorboard" not in report_to:
        return None
    given = getattr(args, "logging_dir", None)
    if isinstance(given, (str, os.PathLike)) and str(given):
        return os.path.abspath(os.path.expanduser(given))
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    output_dir = getattr(args, "output_dir", None)
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        return None
    found = opened_log_dir(Path(output_dir) / "runs")
    return str(found.resolve()) if found is not None else None


def tensorboard_run(args: Any) -> dict[str, dict[str, str]] | None:
    """The tracker run the TensorBoard sink joins: ``{"tensorboard": {"run": folder, "uri": ""}}``, or ``None``.

    Args:
        args: the Trainer's ``TrainingArguments``.

    Returns:
        ``Session.start(tracker_runs=...)``'s entry for the folder of :func:`trainer_tensorboard_dir`.
    """
    folder = trainer_tensorboard_dir(args)
    return {"tensorboard": {"run": folder, "uri": ""}} if folder else None


def opened_log_dir(runs: Path, pid: int | None = None, host: str | None = None) -> Path | None:
    """The folder under ``runs`` (or one level deeper) with the newest event file this process opened.

    Args:
        runs: ``<output_dir>/runs``.
        pid: the process id in the file names (default: this process's).
        host: the host name in the file names (default: this host's).

    Returns:
        The folder, or ``None`` when no event file of this host and process is there. Event
        files with a suffix (another writer's, this package's ``.uma``) and links are left out.
    """
    pid = os.getpid() if pid is None else pid
    host = socket.gethostname() if host is None else host
    best: tuple[int, int] | None = None
    folder: Path | None = None
    for path in _event_files(runs):
        match = _EVENT_FILE.match(path.name)
        if match is None or match["host"] != host or int(match["pid"]) != pid:
            continue
        rank = (int(match["time"]), int(match["n"]))
        if best is None or rank > best:
            best, folder = rank, path.parent
    return folder


def _event_files(runs: Path) -> list[Path]:
    """Regular files named ``events.out.tfevents.*`` in ``runs/*/`` and ``runs/*/*/`` (no links), at most :data:`MAX_ENTRIES` entries read."""
    out: list[Path] = []
    left = [MAX_ENTRIES]

    def scan(folder: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            left[0] -= 1
            if left[0] < 0:
                return
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir() and depth < 2:
                    scan(Path(entry.path), depth + 1)
                elif depth > 0 and entry.name.startswith("events.out.tfevents.") and entry.is_file():
                    out.append(Path(entry.path))
            except OSError:
                continue

    scan(runs, 0)
    return out


__all__ = ["opened_log_dir", "tensorboard_run", "trainer_tensorboard_dir"]
