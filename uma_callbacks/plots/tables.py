"""Table files drawn beside the figures: a result's rows as CSV, uploaded with its files by every sink.

A drawer returns the CSV's path with its PNGs: under
:func:`~uma_callbacks.plots.core.render_result` the bytes are handed to the journal like a
figure's (written into the step's folder, refusing links); otherwise written atomically.
MLflow and W&B upload every file of a record, so a table reaches both as an artifact.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uma_callbacks.core.safe_write import write_atomically
from uma_callbacks.plots import core


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    """``header`` and ``rows`` as UTF-8 CSV; floats with 8 significant digits, NaN/Inf left empty.

    Example:
        >>> csv_bytes(["a", "b"], [[1, 0.5], ["x", float("nan")]]).decode().splitlines()
        ['a,b', '1,0.5', 'x,']
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue().encode("utf-8")


def save_table(header: Sequence[str], rows: Sequence[Sequence[Any]], path: str | Path) -> Path:
    """Save the CSV of ``rows`` as ``path``, or keep its bytes under ``render_result`` (as :func:`save_figure` does).

    Raises:
        OSError: the file could not be written.
    """  # noqa: DOC502 (from write_atomically)
    path = Path(path)
    data = csv_bytes(header, rows)
    captured = core._CAPTURED.get()
    if captured is not None:
        captured[path.name] = data
        return path
    return write_atomically(path, data)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.8g}" if math.isfinite(value) else ""
    return value
