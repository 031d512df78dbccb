"""watch.jsonl read back: hostile and damaged lines are counted and skipped, never followed."""

from __future__ import annotations

import os

from uma_callbacks.engine.announce import (
    WATCH_FILE,
    announce_checkpoint,
    announce_finished,
    announce_run,
    read_announcements,
    release_held,
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
