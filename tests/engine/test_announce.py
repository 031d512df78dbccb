"""watch.jsonl read back: hostile and damaged lines are counted and skipped, never followed."""

from __future__ import annotations

import os

from uma_callbacks.engine.announce import (
    HELD_PATTERNS,
    OPTIMIZER_PATTERNS,
    WATCH_FILE,
    announce_checkpoint,
    announce_finished,
    announce_run,
    read_announcements,
    release_held,
    write_checkpoint_line,
)
from uma_callbacks.engine.journal import append_line

RUN = "ab" * 16


def _checkpoint(run_dir, step):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"not held")
    return folder


def test_a_run_reads_back_with_held_hard_links(tmp_path):
    root = tmp_path / "uma"
    root.mkdir()
    folder = _checkpoint(tmp_path, 2)
    announce_run(root, RUN, {"mlflow": {"run": "r", "uri": "sqlite:///x.db"}, "other": {"run": "y"}}, [{"name": "gradient_flow"}])
    held = announce_checkpoint(root, tmp_path, 2, folder)
    announce_finished(root, 2)
    got = read_announcements(root, tmp_path)
    assert got.run.run == RUN and got.run.trackers == {"mlflow": {"run": "r", "uri": "sqlite:///x.db"}}
    assert got.checkpoints[2].folder == folder.resolve() and got.checkpoints[2].held == held.resolve()
    assert got.finished == 2 and got.bad_lines == 0
    assert os.stat(held / "model.safetensors").st_ino == os.stat(folder / "model.safetensors").st_ino
    assert not (held / "optimizer.pt").exists()  # only what rebuilds the model is held
    release_held(root, held)
    assert not held.exists() and (folder / "model.safetensors").exists()


def test_hostile_and_damaged_lines_are_counted_and_never_followed(tmp_path):
    root = tmp_path / "run" / "uma"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "held").mkdir()
    os.symlink(outside, root / "held" / "checkpoint-9")  # a held "copy" that points outside
    path = root / WATCH_FILE
    announce_run(root, RUN, {}, [])
    hostile = [
        {"kind": "checkpoint", "step": 3, "folder": "../../outside", "held": "", "time": 1.0},
        {"kind": "checkpoint", "step": 4, "folder": "/etc", "held": "", "time": 1.0},
        {"kind": "checkpoint", "step": 5, "folder": "checkpoint-5", "held": "../../../outside", "time": 1.0},
        {"kind": "checkpoint", "step": 9, "folder": "checkpoint-9", "held": "held/checkpoint-9", "time": 1.0},
        {"kind": "checkpoint", "step": -1, "folder": "checkpoint-1", "held": "", "time": 1.0},
        {"kind": "checkpoint", "step": True, "folder": "checkpoint-1", "held": "", "time": 1.0},
        {"kind": "checkpoint", "step": 8, "folder": "checkpoint-8", "held": "", "time": 1.0, "unheld": 5},
        {"kind": "run", "run": "../../" + "a" * 26, "trackers": {}, "metrics": [], "time": 1.0},
        {"kind": "run", "run": RUN, "trackers": {}, "metrics": [{"name": 1}], "time": 1.0},
        {"kind": "surprise"},
    ]
    for payload in hostile:
        append_line(path, payload)
    with open(path, "a") as fh:
        fh.write('{"kind": "checkpoint", "step": 6, "folder": "' + "A" * 200_000 + '"}\n')  # no checksum, huge
        fh.write("not json at all\n")
        fh.write('{"kind": "checkpoint", "st')  # torn last line
    append_line(path, {"kind": "checkpoint", "step": 7, "folder": "checkpoint-7", "held": "", "time": 1.0})
    got = read_announcements(root, tmp_path / "run")
    assert sorted(got.checkpoints) == [7], got.checkpoints
    assert got.run.run == RUN
    assert got.bad_lines == len(hostile) + 3
    release_held(root, outside)  # outside the held folder: refused
    assert outside.is_dir()


def test_the_optimizer_file_is_held_when_asked(tmp_path):
    root = tmp_path / "uma"
    root.mkdir()
    folder = _checkpoint(tmp_path, 2)
    held = announce_checkpoint(root, tmp_path, 2, folder, patterns=(*HELD_PATTERNS, *OPTIMIZER_PATTERNS))
    assert os.path.samefile(held / "optimizer.pt", folder / "optimizer.pt")
    assert read_announcements(root, tmp_path).checkpoints[2].unheld == ""


def test_a_copy_that_cannot_be_held_is_announced_with_why_and_leaves_nothing_half_made(tmp_path):
    root = tmp_path / "uma"
    root.mkdir()
    (root / "held").write_text("a file where the held folder belongs")  # every hold fails
    folder = _checkpoint(tmp_path, 2)
    assert announce_checkpoint(root, tmp_path, 2, folder) is None
    got = read_announcements(root, tmp_path).checkpoints[2]
    assert got.held is None and got.folder == folder.resolve()
    assert got.unheld.startswith(("FileExistsError", "NotADirectoryError")), got.unheld
    assert (root / "held").is_file()


def test_a_line_written_late_keeps_the_time_of_its_save(tmp_path):
    root = tmp_path / "uma"
    root.mkdir()
    folder = _checkpoint(tmp_path, 4)
    write_checkpoint_line(root, tmp_path, 4, folder, None, unheld="OSError: [Errno 28] No space left on device", saved=123.5)
    got = read_announcements(root, tmp_path).checkpoints[4]
    assert (got.time, got.held, got.unheld) == (123.5, None, "OSError: [Errno 28] No space left on device")
