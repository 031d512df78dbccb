"""The sinks of a training that is resumed: the tracker runs it continues.

A resumed training continues its run (:mod:`~uma_callbacks.engine.run_identity`), so its
sinks join the tracker runs that run delivered to (``deliveries.jsonl`` holds the sink, run
and store of each delivered record), instead of opening new ones. A fresh training's sinks
open or join runs as usual (:func:`~uma_callbacks.integrations.registry.resolve_sinks`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.run_identity import tracker_run
from uma_callbacks.integrations.registry import make_sink, resolve_sinks

logger = logging.getLogger(__name__)


def tracker_runs(journal: Journal | None, run: str, entries: Sequence[Any]) -> dict[str, dict[str, str]]:
    """``{tracker name: {"run", "uri"}}``: for each tracker named in ``entries``, the tracker
    run the training run ``run`` last delivered to (names it never delivered to are left out)."""
    if journal is None:
        return {}
    found = {name: tracker_run(journal, run, name) for name in entries if isinstance(name, str)}
    return {name: where for name, where in found.items() if where is not None}


def reopened(name: str, where: Mapping[str, str], root: str | os.PathLike[str]) -> tuple[Any, bool]:
    """``(sink, own)``: the ``name`` sink a resumed training logs to.

    A tracker run the Trainer itself has open (``report_to``: its callback opened it before
    ours) wins: the training's own values go there. Otherwise the sink joins the tracker run
    ``where`` names (the one the resumed run delivered to), and it is ours to finish.
    """
    fresh = make_sink(name, fallback_dir=root)
    capture = getattr(fresh, "capture_active_run", None)
    if callable(capture) and capture():
        if fresh.run_id() != where.get("run"):
            logger.warning(
                "uma: resuming; the Trainer opened %s run %s, the journal's run was %s: logging to the Trainer's",
                name, fresh.run_id(), where.get("run"),
            )  # fmt: skip
        return fresh, False
    sink = make_sink(name, run_id=where.get("run") or None, tracking_uri=where.get("uri") or None, fallback_dir=root)
    return sink, True


def continuing_sinks(
    entries: Sequence[Any], root: str | os.PathLike[str], reopen: Mapping[str, Mapping[str, str]] | None = None
) -> tuple[list[Any], list[Any]]:
    """``(sinks, own)`` for ``entries`` (names and/or sink objects): names in ``reopen`` rejoin
    their tracker runs (:func:`reopened`), the rest go through ``resolve_sinks``."""
    sinks: list[Any] = []
    own: list[Any] = []
    for entry in entries:
        if isinstance(entry, str) and reopen and entry in reopen:
            sink, ours = reopened(entry, reopen[entry], root)
            sinks.append(sink)
            own += [sink] if ours else []
        else:
            more, more_own = resolve_sinks([entry], fallback_dir=root)
            sinks += more
            own += more_own
    return sinks, own
