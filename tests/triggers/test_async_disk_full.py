"""``measure="async"`` on a full disk: training loses no step, and what could not be held or announced is said.

A real full filesystem: a small tmpfs mounted for the test (needs root; skipped otherwise)
holds the whole run folder (checkpoints, journal, held copies: hard links need one
filesystem). Right after the Trainer wrote ``checkpoint-3`` (a callback before the async
one) the disk is filled to its last byte: its blocks, ``watch.jsonl``'s own last page
(padded with blank lines, which readers skip, so the next line needs a new page) and, for
the held copy to fail too, its inodes (a hard link takes one on tmpfs). It is freed at the
end of step 4, before the save at step 6, whose rotation (``save_total_limit=1``) deletes
``checkpoint-3``. Nothing is monkeypatched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tests.tmpfs import mounted_tmpfs
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.engine.announce import HELD_DIR, WATCH_FILE, read_announcements

pytestmark = pytest.mark.slow

STEPS = (3, 6, 9)
NO_SPACE = "[Errno 28] No space left on device"


class Disk:
    """A mounted tmpfs that :meth:`fill` fills up and :meth:`free` empties again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.filler = folder / "filler.bin"
        self.inodes = folder / "inodes"

    def fill(self, watch_file: Path, inodes: bool) -> None:
        """No byte left: the filler takes the free pages, blank lines the rest of ``watch_file``'s
        last page; with ``inodes``, empty files take every inode left."""
        for target in (self.filler, watch_file):
            with open(target, "ab", buffering=0) as fh:
                for size in (65536, 4096, 512, 64, 8, 1):
                    try:
                        while True:
                            fh.write((b"\0" if target == self.filler else b"\n") * size)
                    except OSError:
                        pass  # full at this size: a smaller one fills the rest
        if inodes:
            self.inodes.mkdir()
            try:
                for i in range(1_000_000):
                    (self.inodes / str(i)).touch()
            except OSError:
                pass  # no inode left: that is the point

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        if self.inodes.is_dir():
            for path in self.inodes.iterdir():
                path.unlink()
            self.inodes.rmdir()


@pytest.fixture
def disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "size=4m,nr_inodes=400") as folder:
        yield Disk(folder)


class FullAfterSave(TrainerCallback):
    """Before the async callback: fill the disk once ``checkpoint-<at>`` is written; free it at the end of step ``free_at``."""

    def __init__(self, disk: Disk, run_dir: Path, at: int, free_at: int, inodes: bool) -> None:
        self.disk, self.run_dir, self.at, self.free_at, self.inodes = disk, run_dir, at, free_at, inodes

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.disk.fill(self.run_dir / "uma" / WATCH_FILE, self.inodes)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.free_at:
            self.disk.free()


def _train(disk: Disk, inodes: bool, save_total_limit: int | None):
    from uma_callbacks import UMACallback

    run_dir = disk.folder / "run"
    callback = UMACallback(
        metrics=["gradient_flow"], probe=tiny_lm_dataset(n=8, seed=3), probe_size=8, trackers=[], measure="async"
    )
    full = FullAfterSave(disk, run_dir, at=3, free_at=4, inodes=inodes)
    trainer, losses = run_trainer(
        run_dir, callbacks=[full, callback], max_steps=9, save_steps=3, save_total_limit=save_total_limit
    )
    # no training step lost: every step ran and logged a finite loss; the announcements caught up
    assert trainer.state.global_step == 9 and [s for s, _ in losses] == list(range(1, 10))
    assert all(math.isfinite(loss) for _, loss in losses)
    announced = read_announcements(run_dir / "uma", run_dir)
    assert sorted(announced.checkpoints) == list(STEPS) and announced.finished == 9 and announced.bad_lines == 0
    return run_dir, callback.session.run, announced


def _watch(run_dir: Path):
    from uma_callbacks.triggers.watch import watch

    return watch(run_dir, until_done=True, poll=0.1, device="cpu", draw_figures=False)


def test_an_announcement_that_cannot_be_written_keeps_its_held_copy_and_is_written_at_the_next_save(disk, caplog):
    """``watch.jsonl`` cannot grow at save 3, but the hard links into ``held/`` take no
    block: the line is written at save 6, after the rotation deleted ``checkpoint-3``, with
    the copy held at save 3 and the time of that save; the watcher measures every step."""
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        run_dir, run, announced = _train(disk, inodes=False, save_total_limit=1)
    assert not (run_dir / "checkpoint-3").exists()
    held = run_dir / "uma" / HELD_DIR / "checkpoint-3"
    assert announced.checkpoints[3].held == held.resolve() and (held / "model.safetensors").is_file()
    assert announced.checkpoints[3].time < announced.checkpoints[6].time  # the save's time, not the late write's
    warnings = [r.getMessage() for r in caplog.records if "checkpoint-3" in r.getMessage()]
    late = [m for m in warnings if "not announced yet" in m]
    assert len(late) == 1 and NO_SPACE in late[0] and "its files are held meanwhile" in late[0], warnings

    summary = _watch(run_dir)
    assert summary.ok and summary.measured == list(STEPS), summary.describe()


@pytest.mark.parametrize("save_total_limit", [1, None], ids=["rotated", "kept"])
def test_a_checkpoint_that_cannot_be_held_is_held_at_the_next_save_or_its_error_names_the_full_disk(
    disk, caplog, save_total_limit
):
    """No inode left at save 3: neither the held copy nor the line can be made. At save 6
    the hold is tried again: with the folder kept, it is held and measured; rotated away, the
    line says why it was not held and the watcher's error record for step 3 names the full disk."""
    with caplog.at_level(logging.WARNING, logger="uma_callbacks"):
        run_dir, run, announced = _train(disk, inodes=True, save_total_limit=save_total_limit)
    warnings = [r.getMessage() for r in caplog.records if "checkpoint-3" in r.getMessage()]
    not_held = [m for m in warnings if "not held" in m]
    assert len(not_held) == 1 and NO_SPACE in not_held[0], warnings  # once, though tried again at save 6
    summary = _watch(run_dir)
    if save_total_limit is None:  # the folder was still there at save 6: held then, measured
        assert announced.checkpoints[3].held is not None and announced.checkpoints[3].unheld == ""
        assert summary.ok and summary.measured == list(STEPS), summary.describe()
        return
    assert announced.checkpoints[3].held is None and NO_SPACE in announced.checkpoints[3].unheld
    assert any("announced without a held copy" in m and NO_SPACE in m for m in warnings), warnings
    assert summary.measured == [6, 9]
    ((folder, step, reason),) = summary.errors
    assert step == 3 and folder.endswith("checkpoint-3"), summary.errors
    assert "is gone before it was measured" in reason and f"the training could not hold it: OSError: {NO_SPACE}" in reason
    assert f"error at step 3 ({folder}): checkpoint" in summary.describe()
