"""The backfill shows one line per metric start and end, as the live session does."""

from __future__ import annotations

import re

from tests.test_checkpoints import fake_trainer_run
from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks.cli import main
from uma_callbacks.engine.probe import Probe, save_probe


def test_backfill_prints_a_line_per_metric_start_and_end(tmp_path, capsys):
    run = fake_trainer_run(tmp_path / "run", steps=(1, 2))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=5), 4), run / "uma")
    assert main(["backfill", str(run), "--metrics", "gradient_flow", "--no-figures", "--no-trajectory"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("uma: step")]
    assert [re.sub(r"in \d+\.\d\d s$", "in S", line) for line in lines] == [
        "uma: step 1: gradient_flow started",
        "uma: step 1: gradient_flow ok in S",
        "uma: step 2: gradient_flow started",
        "uma: step 2: gradient_flow ok in S",
    ]
    # a rerun reads the journal: the lines say so
    assert main(["backfill", str(run), "--metrics", "gradient_flow", "--no-figures", "--no-trajectory"]) == 0
    ends = [line for line in capsys.readouterr().err.splitlines() if line.startswith("uma: step") and "started" not in line]
    assert [line.split(" in ")[0] for line in ends] == ["uma: step 1: gradient_flow cached", "uma: step 2: gradient_flow cached"]


def test_no_lines_without_progress(tmp_path, capsys):
    from uma_callbacks import backfill

    run = fake_trainer_run(tmp_path / "run", steps=(1,))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=5), 4), run / "uma")
    backfill(run, metrics=["gradient_flow"], trackers=[], progress=False, trajectory=False, draw_figures=False)
    assert "uma: step" not in capsys.readouterr().err
