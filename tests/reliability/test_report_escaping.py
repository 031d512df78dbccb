"""Issue 17 item 6: ``uma report`` escapes every journal string it writes into report.html.

Hostile strings in every field a record carries to the page (metric name, scalar name,
status, error message, and a string ``step`` written with a valid checksum) never reach
the HTML as markup: foreign-shaped records are skipped (item 4) and the rest is escaped.
"""

from __future__ import annotations

import pytest

from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import Journal, append_line
from uma_callbacks.report import write_report

pytest.importorskip("matplotlib")

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"  # no '/': a top-level scalar name


def test_report_html_holds_no_markup_from_the_journal(tmp_path):
    journal = Journal(tmp_path / "uma")
    journal.append(Record(step=1, metric=f"m{SCRIPT}", status="ok", scalars={f"x{IMG}": 1.0}))
    journal.append(Record(step=2, metric=f"m{SCRIPT}", status="ok", scalars={f"x{IMG}": 2.0}))
    journal.append(
        Record(step=3, metric=f"e{SCRIPT}", status="error", error={"type": "E", "message": "'\" onload=x " + SCRIPT})
    )
    append_line(journal.path, {"step": SCRIPT, "metric": "m", "status": "error", "error": {"message": "x"}})
    append_line(journal.path, {"step": 4, "metric": "m", "status": SCRIPT})
    _, page = write_report(tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # metric, scalar, error: shown, inert
    assert "' onload" not in text and '" onload' not in text
