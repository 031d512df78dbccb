"""``uma report`` keeps a backfill's other configuration apart, and lists skips apart from errors.

A real Trainer run (tiny Qwen2 from config) measures ``fisher`` with ``top_k=2`` and an
interpolation that has no previous checkpoint at the first save; ``uma backfill`` then
measures the same checkpoints with ``fisher:top_k=3``. The report must draw two series,
``fisher (top_k=2)`` and ``fisher (top_k=3)``, each holding its own configuration's values,
never one plain ``fisher``; and the first save's interpolation skip sits under "Skipped".
"""

from __future__ import annotations

import html
import re

import pytest

from tests.trainer_cases import run_trainer
from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal
from uma_callbacks.plots.panels import report_figure
from uma_callbacks.report import collect_series, outcomes, write_report

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    """A trained run measured with fisher top_k=2, then backfilled with fisher top_k=3."""
    from uma_callbacks import METRICS, UMACallback
    from uma_callbacks.cli import main

    out = tmp_path_factory.mktemp("run")
    metrics = [METRICS["fisher"](top_k=2, seed=42), METRICS["interpolation"](n_points=3)]
    callback = UMACallback(metrics=metrics, probe_size=8, probe_batch_size=8, trackers=[], seed=42)
    run_trainer(out, callbacks=[callback], max_steps=4, save_steps=2)
    assert main(["backfill", str(out), "--metric", "fisher:top_k=3", "--no-trajectory", "--no-figures"]) == 0
    return out


def _table(page: str) -> tuple[list[str], dict[int, dict[str, str]]]:
    """The Values table of report.html: (column names, {step: {column: cell}})."""
    table = page.split("<h2>Values</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    head = [html.unescape(c) for c in re.findall(r"<th>(.*?)</th>", rows[0])][1:]
    out = {}
    for row in rows[1:]:
        step = int(re.search(r"<th>(.*?)</th>", row).group(1))
        out[step] = dict(zip(head, [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]))
    return head, out


def test_a_backfill_with_another_config_is_its_own_labelled_series(backfilled, tmp_path):
    journal = Journal(backfilled / "uma")
    fisher = [r for r in journal.records() if r.metric == "fisher" and r.status == "ok"]
    by_top_k = {k: {r.step: r for r in fisher if r.meta["config"]["top_k"] == k} for k in (2, 3)}
    assert sorted(by_top_k[2]) == sorted(by_top_k[3]) == [2, 4]  # both configurations at both saves

    scalar = next(k for k in by_top_k[2][4].scalars if "condition_number" in k and "/" not in k)  # top-k only
    assert by_top_k[2][4].scalars[scalar] != pytest.approx(by_top_k[3][4].scalars[scalar])  # the configs differ

    _, page = write_report(backfilled, tmp_path)
    head, table = _table(page.read_text(encoding="utf-8"))
    assert f"fisher (top_k=2)/{scalar}" in head and f"fisher (top_k=3)/{scalar}" in head
    assert not any(name.startswith("fisher/") for name in head)  # never merged into plain fisher
    for k in (2, 3):
        for step, record in by_top_k[k].items():
            assert float(table[step][f"fisher (top_k={k})/{scalar}"]) == pytest.approx(record.scalars[scalar], rel=1e-5)
    assert "<h2>Configurations</h2>" in page.read_text(encoding="utf-8")

    series = collect_series(journal)
    assert {n.rsplit("/", 1)[0] for n in series if n.startswith("fisher")} == {"fisher (top_k=2)", "fisher (top_k=3)"}
    built = report_figure(series)  # the panel of that quantity: one labelled line per configuration
    try:
        panel = next(p for p in built.panels if p.metric == "fisher" and p.scalar == scalar)
        ax = built.figure.axes[built.panels.index(panel)]
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["top_k=2", "top_k=3"]
        assert len(ax.get_lines()) == 2
    finally:
        plt.close(built.figure)


def test_the_first_checkpoint_skip_is_listed_under_skipped_not_errors(backfilled, tmp_path):
    journal = Journal(backfilled / "uma")
    listed = outcomes(journal)
    assert [(r.metric, r.step) for r in listed["skipped"]] == [("interpolation", 2)]
    assert listed["errors"] == []

    _, page = write_report(backfilled, tmp_path)
    text = page.read_text(encoding="utf-8")
    skipped = text.split("<h2 id='skipped'>Skipped</h2>", 1)[1].split("</ul>", 1)[0]
    assert "interpolation" in skipped and "no previous checkpoint yet" in skipped
    assert "<h2 id='errors'>" not in text


def test_errors_stay_errors_and_a_skip_measured_later_is_not_listed(tmp_path):
    journal = Journal(tmp_path)
    journal.append(Record(step=1, metric="m", status="error", error={"type": "E", "message": "broken"}))
    journal.append(Record(step=1, metric="n", status="skipped", error={"type": "S", "message": "no room"}))
    journal.append(Record(step=1, metric="n", status="ok", scalars={"x": 1.0}))
    journal.append(Record(step=2, metric="n", status="ok", scalars={"x": 2.0}))
    listed = outcomes(journal)
    assert [r.metric for r in listed["errors"]] == ["m"]
    assert listed["skipped"] == [] and [r.metric for r in listed["measured_later"]] == ["n"]
    _, page = write_report(tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "broken" in text.split("<h2 id='errors'>Errors</h2>", 1)[1]
    assert "1 earlier failure(s) or skip(s) were measured again later" in text


def test_a_budget_scaled_save_stays_in_its_configured_series(tmp_path):
    """Under a compute budget one save runs 3 probes of the 10 asked for: still one series, not two."""
    journal = Journal(tmp_path)
    asked = {"metric": "hessian", "hutchinson_samples": 10, "top_k": 2}
    journal.append(Record(step=1, metric="hessian", status="ok", scalars={"trace": 1.0}, meta={"config": asked}))
    scaled = {**asked, "hutchinson_samples": 3}
    budget = {"scaled": {"hutchinson_samples": [10, 3]}}
    journal.append(
        Record(step=2, metric="hessian", status="ok", scalars={"trace": 2.0}, meta={"config": scaled, "compute_budget": budget})
    )
    other = {**asked, "top_k": 5}  # another configuration asked for: its own series
    journal.append(Record(step=2, metric="hessian", status="ok", scalars={"trace": 3.0}, meta={"config": other}))
    assert collect_series(journal) == {
        "hessian (top_k=2)/trace": {1: 1.0, 2: 2.0},
        "hessian (top_k=5)/trace": {2: 3.0},
    }
