"""TensorBoard sink: scalars, figures and per-module histograms in a TensorBoard log folder.

Written with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package,
``pip install 'uma-callbacks[tensorboard]'``), into its own event file
(``events.out.tfevents.*.uma``) beside whatever else writes to the folder: TensorBoard
reads every event file of a folder as one run. Per record, at ``record.step`` (the
checkpoint's global step):

- scalars (and ``seconds``, ``peak_mb``), keys through
  :func:`~uma_callbacks.integrations.base.tracker_key` as for MLflow and W&B, then named for
  TensorBoard's groups (:func:`tensorboard_tag`);
- the record's outcome as a number, ``uma.<metric>.cost/status_code`` (0 ok, 1 partial, 2 skipped,
  3 timeout, 4 interrupted, 5 error: :mod:`~uma_callbacks.integrations.status_codes`);
- figures: each PNG in ``record.files`` as an image ``uma.<metric>/figures/<name>``;
- per-module values (the ``layers/<module>/<scalar>`` scalars) as one histogram per
  scalar, ``uma.<metric>/modules/<scalar>``: its values across the modules;
- a record that is not ``ok``/``cached`` as text ``uma.<metric>/status`` (its status and
  message); params once per value as text ``uma.<key>`` at step 0 (another config's under
  ``uma.<metric>-<config hash>.config``).

Tags: TensorBoard groups the cards of its Scalars, Time Series, Images and Histograms pages
by the part of a tag before its first ``/``. W&B's and MLflow's ``uma/<metric>/<scalar>``
would put every value of every metric into one group ``uma`` (hundreds of cards, paged, the
headline values behind the per-layer ones), so this sink writes the key's metric into the
group: ``uma/fisher/trace`` is ``uma.fisher/trace``, and a per-item value
``uma/<metric>/<group>/<item>/<scalar>`` (``layers/<module>/...``, ``params/<name>/...``)
goes to a group of its own, ``uma.fisher.layers/<module>/trace``. The groups sort beside the
Trainer's ``train``/``eval``: ``uma.fisher``, ``uma.fisher.layers``, ``uma.gradient_flow``,
..., ``uma.spike`` (the loss spike's z-score and value), ``uma.spike.fisher``, ...

The folder (the run, :meth:`TensorBoardSink.run_id`) is, in this order: ``log_dir`` given;
``run_id`` given (a log folder to join: the Trainer's own, which ``UMACallback`` passes with
``report_to=["tensorboard"]``, :mod:`~uma_callbacks.triggers.trainer_tensorboard`; or one this
run delivered to before, for a resume or ``uma sync``; an absolute path, not a file);
``TENSORBOARD_LOGGING_DIR``; ``<fallback_dir>/tensorboard`` (the journal folder's). The sink's
event file is its own either way, so it is opened and closed by the session like a run it
opened (:meth:`~TensorBoardSink.finish`).

Idempotent per (run, step, key): at :meth:`~TensorBoardSink.start` the sink reads back the
points its earlier event files in the folder hold (bounded: :data:`SCAN_MAX_BYTES`, every
parse error caught, files that are links skipped) and never writes one twice; it keeps the
ones it writes. Each record is flushed to disk before :meth:`~TensorBoardSink.log_record`
returns; a write that fails drops the writer, so the retry (the next delivery) opens a new
one and reads back what reached the disk. Every public method keeps the global RNGs as they
were. Only files inside the journal folder are read.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from uma_callbacks.core.records import PREFIX, Record
from uma_callbacks.integrations.base import Sink, keeps_rng, param_key, tracker_key, uploadable_files
from uma_callbacks.integrations.status_codes import status_values

logger = logging.getLogger(__name__)

_INSTALL = "TensorBoardSink needs tensorboard: pip install 'uma-callbacks[tensorboard]'"
#: Suffix of this sink's event files (the others in the folder are not read back).
EVENT_SUFFIX = ".uma"
#: Bytes of earlier event files read back at start, all files together (the rest: the journal's delivery log).
SCAN_MAX_BYTES = 512 * 2**20
_TEXT_SUFFIX = "/text_summary"
#: Scalars about the measurement rather than the model (DESIGN's ``seconds``/``peak_mb``, the
#: budget's overrun flag, the outcome code): their own group ``uma.<metric>.cost``.
COST_SCALARS = ("seconds", "peak_mb", "over_budget", "status_code")
_LAYER_KEY = re.compile(r"^layers/(?P<module>.+)/(?P<scalar>[^/]+)$")


def _import_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        ModuleNotFoundError: the ``tensorboard`` package is not installed (names the pip extra).
    """
    import importlib.util  # noqa: PLC0415

    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a blocked module (sys.modules entry None)
        found = False
    if not found:
        raise ModuleNotFoundError(_INSTALL)
    try:
        from torch.utils.tensorboard import SummaryWriter  # the only place the package is imported
    except ImportError as err:
        raise ModuleNotFoundError(_INSTALL) from err
    return SummaryWriter


class TensorBoardSink(Sink):
    """Log records to a TensorBoard log folder (see the module docstring).

    Args:
        log_dir: the folder to write to.
        run_id: a log folder to join (absolute path: the Trainer's own log folder, or one this
            run delivered to before), used when ``log_dir`` is not given.
        fallback_dir: the journal folder; ``<fallback_dir>/tensorboard`` when nothing else names a folder.
        flush_secs: seconds between the writer's own flushes (each record is flushed anyway).

    Raises:
        ModuleNotFoundError: tensorboard is not installed (names the pip extra).
    """

    name = "tensorboard"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        fallback_dir: str | os.PathLike[str] | None = None,
        flush_secs: int = 30,
    ) -> None:
        super().__init__()
        self._writer_class = _import_writer()
        self._given = Path(log_dir) if log_dir is not None else _rejoined(run_id)
        self._fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self._flush_secs = int(flush_secs)
        self._log_dir: Path | None = None  # set by start
        self._writer: Any = None
        #: ``(tag, step)`` the folder's uma event files hold; ``None`` until read back at start
        self._held: set[tuple[str, int]] | None = None
        self._held_params: dict[str, str] = {}
        self._refused_files: set[str] = set()
        self._bad_figures: set[str] = set()

    # ------------------------------------------------------------------ run
    @keeps_rng
    def start(self) -> None:
        """Open this sink's event file in the log folder (a no-op once open; retried after a failure).

        Nothing of a failed try is kept: the folder, what it holds and the writer are set
        together once the writer exists.

        Raises:
            OSError: the folder cannot be made or written.
        """  # noqa: DOC502 (from mkdir and SummaryWriter)
        if self._writer is not None:
            return
        folder = self._folder()
        folder.mkdir(parents=True, exist_ok=True)
        held, params = _held_points(folder)
        writer = self._writer_class(log_dir=str(folder), filename_suffix=EVENT_SUFFIX, flush_secs=self._flush_secs)
        self._log_dir, self._held, self._writer = folder, held, writer
        self._held_params = params
        logger.info("uma: writing TensorBoard events to %s", folder)

    def _folder(self) -> Path:
        if self._given is not None:
            return self._given.expanduser().resolve()
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if env:
            return Path(env).expanduser().resolve()
        if self._fallback_dir is not None:
            return (self._fallback_dir / "tensorboard").resolve()
        return (Path.cwd() / "runs" / "uma").resolve()

    def run_id(self) -> str:
        """The log folder (absolute; ``""`` before :meth:`start`)."""
        return str(self._log_dir) if self._log_dir is not None else ""

    @property
    def log_dir(self) -> Path | None:
        """The log folder (after :meth:`start`)."""
        return self._log_dir

    # ------------------------------------------------------------------ writes
    @keeps_rng
    def log_record(self, record: Record, root: Path) -> None:
        """Write the record's scalars, histograms, figures and status at ``record.step``, then flush.

        Raises:
            Exception: the writer failed (disk full): it is dropped, and the next call opens
                a new one after reading back what reached the disk.
        """  # noqa: DOC502 (the writer's own errors, passed on)
        self.start()
        assert self._held is not None
        step = int(record.step)
        written: list[tuple[str, int]] = []
        metric = record.metric

        def tag_of(key: str) -> str:
            return tensorboard_tag(metric, tracker_key(key))

        try:
            for key, value in {**record.log_values(), **status_values(record)}.items():
                tag = tag_of(key)
                if math.isfinite(value) and (tag, step) not in self._held:
                    self._writer.add_scalar(tag, value, step)
                    written.append((tag, step))
            for scalar, values in _module_values(record).items():
                tag = tag_of(f"{PREFIX}/{metric}/modules/{scalar}")
                if (tag, step) not in self._held:
                    self._writer.add_histogram(tag, _array(values), step)
                    written.append((tag, step))
            for path in uploadable_files(Path(root), record, self._refused_files):
                if path.suffix.lower() != ".png":
                    continue
                tag = tag_of(f"{PREFIX}/{metric}/figures/{_figure_name(metric, path)}")
                if (tag, step) in self._held:
                    continue
                image = self._read_png(path)
                if image is not None:
                    self._writer.add_image(tag, image, step, dataformats="HWC")
                    written.append((tag, step))
            if record.status not in ("ok", "cached"):
                tag = tag_of(f"{PREFIX}/{metric}/status")
                if (tag, step) not in self._held:
                    self._writer.add_text(tag, _status_text(record), step)
                    written.append((tag, step))
            self._writer.flush()
        except Exception:
            self._drop_writer()
            raise
        self._held.update(written)

    def _read_png(self, path: Path) -> Any:
        """The PNG as an ``H x W x C`` uint8 array, or ``None`` (warned once) when it cannot be read."""
        import numpy as np  # noqa: PLC0415
        from PIL import Image  # noqa: PLC0415 (matplotlib's dependency; figures come from it)

        try:
            with Image.open(path) as image:
                image.load()
                return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
        except Exception as err:  # noqa: BLE001 (a damaged PNG on disk: left out, the record goes on)
            if str(path) not in self._bad_figures:
                self._bad_figures.add(str(path))
                logger.warning("uma: figure %s not logged to TensorBoard: unreadable (%s: %.200s)", path, type(err).__name__, err)
            return None

    @keeps_rng
    def log_params(self, params: dict[str, Any]) -> None:
        """Write each param as text ``uma.<key>`` at step 0, each value once (another value under its variant key)."""
        self.start()
        try:
            for key, value in params.items():
                tag = tracker_key(f"{PREFIX}.{key}")
                text = str(value)[:5000]
                target = param_key(tag, text, value, self._held_params)
                if target is not None:
                    self._writer.add_text(target, text, 0)
                    self._held_params[target] = text
            self._writer.flush()
        except Exception:
            self._drop_writer()
            raise

    @keeps_rng
    def finish(self) -> None:
        """Flush and close this sink's event file."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def _drop_writer(self) -> None:
        writer, self._writer, self._held = self._writer, None, None
        try:
            writer.close()
        except Exception as err:  # noqa: BLE001 (already failing; the caller raises the first error)
            logger.debug("uma: closing a failed TensorBoard writer: %s", err)


def _rejoined(run_id: str | None) -> Path | None:
    """The log folder ``run_id`` names (a run this journal delivered to), or ``None`` when it names none.

    The id is read from disk (the journal's delivery log): only an absolute path that is not
    a file is taken; anything else is warned about and the default folder is used.
    """
    if not run_id:
        return None
    try:
        path = Path(run_id)
        if path.is_absolute() and not path.is_file() and "\x00" not in run_id:
            return path
    except (OSError, ValueError):
        pass
    logger.warning("uma: TensorBoard run id %r is not a log folder; writing to the default folder", run_id[:200])
    return None


def tensorboard_tag(metric: str, key: str) -> str:
    """The TensorBoard tag of a tracker key ``uma/<metric>/<rest>``: the metric named in the tag's group.

    TensorBoard groups cards by the tag's part before its first ``/``. ``uma/<metric>/<name>``
    becomes ``uma.<metric>/<name>`` (a ``/`` in the metric's own name, ``spike/fisher``, becomes
    ``.``); a per-item key ``uma/<metric>/<group>/<item>/<scalar>`` (three parts or more after
    the metric) becomes ``uma.<metric>.<group>/<item>/<scalar>``, a group of its own; what the
    measurement cost and how it ended (:data:`COST_SCALARS`) goes to ``uma.<metric>.cost``, so
    the metric's own group shows its values only. A key
    that does not start with ``uma/<metric>/`` is returned as it is.

    Args:
        metric: the record's metric (``fisher``, ``spike/fisher``).
        key: the tracker key (:func:`~uma_callbacks.integrations.base.tracker_key`).

    Returns:
        The tag.

    Example:
        >>> tensorboard_tag("fisher", "uma/fisher/trace")
        'uma.fisher/trace'
        >>> tensorboard_tag("gradient_flow", "uma/gradient_flow/layers/model.layers.0.mlp/norm")
        'uma.gradient_flow.layers/model.layers.0.mlp/norm'
        >>> tensorboard_tag("spike/fisher", "uma/spike/fisher/figures/spectrum")
        'uma.spike.fisher/figures/spectrum'
        >>> tensorboard_tag("fisher", "uma/fisher/seconds")
        'uma.fisher.cost/seconds'
    """
    head = f"{PREFIX}/{metric}/"
    if not key.startswith(head) or len(key) == len(head):
        return key
    group, rest = f"{PREFIX}.{metric.replace('/', '.')}", key[len(head) :]
    parts = rest.split("/")
    if len(parts) >= 3:
        group, rest = f"{group}.{parts[0]}", "/".join(parts[1:])
    elif rest in COST_SCALARS:
        group = f"{group}.cost"
    return f"{group}/{rest}"


def _held_points(folder: Path) -> tuple[set[tuple[str, int]], dict[str, str]]:
    """``(tag, step)`` of every value this sink's event files in ``folder`` hold, and the params (text at step 0).

    Bounded and distrustful: only regular files named ``events.out.tfevents.*.uma``, at most
    :data:`SCAN_MAX_BYTES` in all (newest last, so the oldest are read); a file that cannot be
    parsed keeps what was read before the damage.
    """
    held: set[tuple[str, int]] = set()
    params: dict[str, str] = {}
    try:
        files = sorted(
            (p for p in folder.iterdir() if p.name.startswith("events.out.tfevents.") and p.name.endswith(EVENT_SUFFIX)),
            key=lambda p: p.name,
        )
    except OSError:
        return held, params
    budget = SCAN_MAX_BYTES
    for path in files:
        try:
            if path.is_symlink() or not path.is_file():
                continue
            size = path.stat().st_size
        except OSError:
            continue
        if size > budget:
            logger.warning("uma: TensorBoard event files in %s past %d MiB not read back", folder, SCAN_MAX_BYTES >> 20)
            break
        budget -= size
        try:
            _read_events(path, held, params)
        except Exception as err:  # noqa: BLE001 (a damaged or hostile file: what was read is kept)
            logger.warning("uma: TensorBoard event file %s read back in part (%s: %.200s)", path, type(err).__name__, err)
    return held, params


def _read_events(path: Path, held: set[tuple[str, int]], params: dict[str, str]) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # type: ignore[import-untyped]  # noqa: PLC0415

    for event in EventFileLoader(str(path)).Load():
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            tag = value.tag
            if tag.endswith(_TEXT_SUFFIX):
                tag = tag[: -len(_TEXT_SUFFIX)]
                if tag.startswith(f"{PREFIX}.") and value.tensor.string_val:
                    params[tag] = value.tensor.string_val[0].decode("utf-8", "replace")
                    continue
            held.add((tag, int(event.step)))


def _module_values(record: Record) -> dict[str, list[float]]:
    """``{scalar: [value per module]}`` from the record's finite ``layers/<module>/<scalar>`` scalars."""
    out: dict[str, list[float]] = {}
    for key, value in sorted(record.scalars.items()):
        match = _LAYER_KEY.match(key)
        if match and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.setdefault(match["scalar"], []).append(float(value))
    return out


def _array(values: list[float]) -> Any:
    import numpy as np  # noqa: PLC0415

    return np.asarray(values, dtype=np.float64)


def _figure_name(metric: str, path: Path) -> str:
    stem = path.stem
    for prefix in (f"{metric}-", f"{metric}_"):
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return stem


def _status_text(record: Record) -> str:
    error = record.error if isinstance(record.error, dict) else {}
    return f"{record.status} at step {record.step}: {error.get('message', '')}"[:5000]
