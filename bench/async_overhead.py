"""What measuring beside the training costs the training: ``measure="async"`` + ``uma watch``.

The same short training (a small Qwen2 from config on random tokens, the same seed, data
and save steps) runs in this one script, pinned to one core (``os.sched_setaffinity``,
``torch.set_num_threads(1)``), in three cases:

1. ``async``: ``UMACallback(measure="async")`` announces each complete checkpoint, and
   ``uma watch RUN_DIR --until-done`` (a subprocess pinned to another core,
   ``OMP_NUM_THREADS=1``) measures it with the same metrics;
2. ``plain``: no callback, run twice (before and after the async case); the faster of the
   two is the reference;
3. ``inprocess``: the same metrics measured at each save in the training process
   (``measure="inline"``, no compute budget).

The metrics at every save are gradient_flow, fisher and an 11x11 landscape. All three cases
log to one MLflow SQLite store (``report_to=["mlflow"]``; the callbacks follow it), created
before any timing. A short warm-up run first takes the one-time import costs out of the
timings. The training time is the wall time of ``Trainer.train()``.

Ends with one ``name=value`` line per figure:

    async_train_overhead=<async train time / plain - 1>           (target <= 0.02)
    inprocess_train_overhead=<in-process train time / plain - 1>
    async_callback_seconds=<time in the async callback's event handlers, in all>
    async_callback_seconds_per_save=<time in its save handler, per save>
    busy_neighbour_train_overhead=<plain beside a busy loop on the watcher's core / plain - 1>
        (--control: what any process on the other core costs on this machine)
    async_train_overhead_vs_busy_neighbour=<async train time / plain beside a busy loop - 1>
        (--control: what the async callback and the watcher cost beyond what any process on
        the other core costs; on a machine whose two cores share a physical core or its
        caches, this is the figure that is ours)
    *_excluding_core_wait=<the same with each train time less the time the training
        thread waited for its core (/proc/thread-self/schedstat): on a shared machine,
        other processes crowd onto the training's core while the watcher holds the other>
    watch_lag_seconds_step_<N>=<save finished -> the watcher's records for step N logged>
    watch_lag_seconds_max=<the largest of these>
    watch_total_seconds=<the watcher's wall time, start to exit>
    watch_after_train_seconds=<from the end of train() to the watcher's exit>
    watch_exit_code=<the watcher's exit code (0: every checkpoint measured)>
    async_equals_inprocess_max_rel_diff=<largest relative difference of the watcher's values to the in-process ones>

"Save finished" is the checkpoint line's ``time`` in ``<run>/uma/watch.jsonl``; "logged" is
when the watcher printed its progress line for that step, which it does after the step's
records are journalled and delivered to MLflow. The first checkpoint's lag includes the
watcher's start (Python and torch imports), as it starts with the training.

Usage::

    python bench/async_overhead.py --quick     # under 120 s on 2 CPU cores
    python bench/async_overhead.py --quick --control   # plus the busy-neighbour case
    python bench/async_overhead.py             # a larger model, 400 steps: a few minutes

On a machine shared with other work the wall times mean little: the ``waited for the core``
seconds printed per case say how much of each was other processes' (ideally about 0).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import torch  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from uma_callbacks import UMACallback  # noqa: E402
from uma_callbacks.engine.announce import read_announcements  # noqa: E402
from uma_callbacks.engine.journal import Journal  # noqa: E402
from uma_callbacks.integrations.uris import sqlite_uri  # noqa: E402

#: The metrics at every save, as the callback takes them (names and specs, seeded by seed=42)
METRICS = ["gradient_flow", "fisher", "landscape:n_points=11"]
#: The same for ``uma watch`` (its --seed defaults to 42 too)
WATCH_METRICS = ["--metrics", "gradient_flow,fisher", "--metric", "landscape:n_points=11"]
_PROGRESS = re.compile(r"watch: step (\d+):")


def pin(core: int) -> None:
    """Pin every thread of this process to ``core`` (new threads inherit it) and use one torch thread."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that just ended
            pass
    torch.set_num_threads(1)


def dataset(n: int, length: int, vocab: int, seed: int = 0):
    """Random token rows (``input_ids`` = ``labels``)."""
    import datasets

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


@dataclass
class Timing:
    """One ``train()`` call.

    Attributes:
        wall: its wall time, in seconds.
        cpu: the seconds the training thread ran on its core (``/proc/thread-self/schedstat``).
        wait: the seconds it was ready to run but waited for its core (other processes on it).
        hooks: ``{callback class: seconds in its Trainer event handlers}``.
    """

    wall: float
    cpu: float
    wait: float
    hooks: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """``wall (cpu, waited)`` in seconds."""
        return f"{self.wall:.2f} (on-core {self.cpu:.2f}, waited for the core {self.wait:.2f})"


def ratio(case: Timing, plain: Timing) -> float:
    """``case`` over ``plain``, each wall time less the time the training waited for its core (other processes)."""
    return (case.wall - case.wait) / (plain.wall - plain.wait)


def sched_seconds() -> tuple[float, float]:
    """``(seconds run, seconds waited on the run queue)`` of the calling thread; zeros where the kernel hides them."""
    try:
        run_ns, wait_ns, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def time_hooks(callback: object, spent: dict[str, float], label: str) -> None:
    """Add the seconds each Trainer event handler of ``callback`` takes to ``spent[label]`` and ``spent[label.event]``.

    The wrappers are set on the instance, where the Trainer looks each event up.
    """
    for name in dir(type(callback)):
        if not name.startswith("on_"):
            continue
        hook = getattr(callback, name)

        def timed(*args, _hook=hook, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                spent[label] = spent.get(label, 0.0) + took
                spent[f"{label}.{_name}"] = spent.get(f"{label}.{_name}", 0.0) + took

        setattr(callback, name, timed)


def train(out: Path, size: dict, callbacks: list, steps: int | None = None, save_steps: int | None = None) -> Timing:
    """Train the model of ``size`` from seed 0 into ``out``, logging to MLflow; times ``train()``."""
    from shakespeare import tiny_qwen2

    steps = steps or size["steps"]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_steps or size["save_steps"],
        per_device_train_batch_size=size["batch"],
        logging_steps=10,
        learning_rate=1e-3,
        report_to=["mlflow"],
        use_cpu=True,
        disable_tqdm=True,
        save_only_model=True,
        seed=0,
        data_seed=0,
    )
    model = tiny_qwen2(size["vocab"], hidden=size["hidden"], layers=size["layers"], heads=4, seed=0)
    data = dataset(steps * size["batch"], size["seq"], size["vocab"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # no log lines printed while timed
    hooks: dict[str, float] = {}
    for cb in trainer.callback_handler.callbacks:
        time_hooks(cb, hooks, type(cb).__name__)
    run0, wait0 = sched_seconds()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    run1, wait1 = sched_seconds()
    return Timing(wall, run1 - run0, wait1 - wait0, hooks)


class Watcher:
    """``uma watch RUN_DIR --until-done`` as a subprocess on ``core``, started before the training.

    A shell waits for the training's run line (``uma/watch.jsonl``) and then becomes the
    watcher (``exec``), so spawning it costs the training nothing. Its progress lines are
    read on a thread and stamped with the time they arrive.
    """

    def __init__(self, run_dir: Path, core: int, poll: float) -> None:
        self.announce = announce = run_dir / "uma" / "watch.jsonl"
        cli = [sys.executable, "-m", "uma_callbacks.cli", "watch", str(run_dir), *WATCH_METRICS,
               "--until-done", "--poll", str(poll), "--device", "cpu", "--no-figures"]  # fmt: skip
        script = f"while [ ! -s {shlex.quote(str(announce))} ]; do sleep 0.05; done; exec {shlex.join(cli)}"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # fmt: skip
        self.started = time.time()
        self.proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)  # fmt: skip
        os.sched_setaffinity(self.proc.pid, {core})  # it inherited this process's core; exec keeps the new one
        self.lines: list[str] = []
        self.logged: dict[int, float] = {}
        self.ended: float | None = None
        self.cores: set[int] = set()  # where its threads could run, seen at each progress line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            self.lines.append(line.rstrip("\n"))
            match = _PROGRESS.match(line)
            if match:
                self.logged.setdefault(int(match.group(1)), now)
                self.cores |= self._cores()

    def _cores(self) -> set[int]:
        """The cores the watcher's threads may run on, now."""
        cores: set[int] = set()
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                cores |= os.sched_getaffinity(int(tid))
        except OSError:  # it exited, or a thread did
            pass
        return cores

    def wait(self, timeout: float) -> int:
        """Wait for the watcher to exit (killed after ``timeout`` seconds); returns its exit code."""
        if not self.announce.exists():  # the training never announced itself: the shell would wait for ever
            timeout = 0.0
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        self.ended = time.time()
        return code


def busy_neighbour(out: Path, size: dict, core: int) -> Timing:
    """The plain training beside a busy loop pinned to ``core``: what any process there costs the training."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spin.pid, {core})
        return train(out, size, [])
    finally:
        spin.kill()
        spin.wait()


def values(records) -> dict[tuple[int, str, str], float]:
    """``{(step, metric, scalar): value}`` of the finished records."""
    return {(r.step, r.metric, k): float(v) for r in records if r.status in ("ok", "cached") for k, v in r.scalars.items()}


def max_rel_diff(got: dict, want: dict) -> float:
    """Largest ``|got - want| / max(|want|, 1e-12)`` over ``want``'s finite keys; inf where ``got`` lacks one."""
    worst = 0.0
    for key, value in want.items():
        if not math.isfinite(value):
            continue
        other = got.get(key)
        if other is None or not math.isfinite(other):
            return math.inf
        worst = max(worst, abs(other - value) / max(abs(value), 1e-12))
    return worst


def mlflow_once_per_step(uri: str, run_id: str, records) -> bool:
    """Whether the MLflow run holds each of the watcher's keys once per step, at the checkpoints' steps."""
    from mlflow.tracking import MlflowClient

    from uma_callbacks.integrations.base import tracker_key

    client = MlflowClient(tracking_uri=uri)
    expected: dict[str, set[int]] = {}
    for r in records:
        for key in r.log_values():
            expected.setdefault(tracker_key(key), set()).add(r.step)
    for key, steps in expected.items():
        got = [m.step for m in client.get_metric_history(run_id, key)]
        if sorted(got) != sorted(steps):
            return False
    return bool(expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 120 s on 2 cores")
    parser.add_argument("--cores", default=None, metavar="TRAIN,WATCH",
                        help="the training's core and the watcher's (default: the first two this process may use)")
    parser.add_argument("--poll", type=float, default=0.2, help="the watcher's --poll (default 0.2 s)")
    parser.add_argument("--control", action="store_true",
                        help="also the plain training beside a busy loop on the watcher's core (busy_neighbour_train_overhead): "
                        "what any process on the other core costs on this machine (about 10 s more)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders and the MLflow store (printed)")
    args = parser.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    if args.cores:
        train_core, watch_core = (int(c) for c in args.cores.split(","))
    elif len(allowed) >= 2:
        train_core, watch_core = allowed[0], allowed[1]
    else:
        print(f"async_overhead: needs two cores (one for the training, one for the watcher); this process may use {allowed}")
        return 2
    if args.quick:  # about 10 s of training per case on one core; saves at 50, 100, 150
        size = dict(vocab=1000, hidden=128, layers=2, seq=64, batch=8, steps=150, save_steps=50, probe=16)
    else:
        size = dict(vocab=2000, hidden=192, layers=3, seq=64, batch=8, steps=400, save_steps=100, probe=32)
    bench_started = time.perf_counter()
    logging.disable(logging.WARNING)
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pin(train_core)
    tmp = Path(tempfile.mkdtemp(prefix="uma-async-bench-"))
    uri = sqlite_uri(tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "async-overhead"
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).create_experiment("async-overhead")  # the store's schema, before any timing
    probe = dataset(size["probe"], size["seq"], size["vocab"], seed=1)

    def callback(measure: str, probe_size: int = size["probe"]) -> UMACallback:
        return UMACallback(metrics=METRICS, probe=probe, probe_size=probe_size, measure=measure, draw_figures=False)

    # warm-up: imports and first calls (Trainer, MLflow, the metrics, the announcements)
    train(tmp / "warmup-inline", size, [callback("inline", 4)], steps=2, save_steps=2)
    train(tmp / "warmup-async", size, [callback("async", 4)], steps=2, save_steps=2)

    warmed = time.perf_counter()
    plain_before = train(tmp / "plain-before", size, [])
    run_dir = tmp / "async"
    watcher = Watcher(run_dir, watch_core, args.poll)
    try:
        asynchronous = train(run_dir, size, [callback("async")])
    finally:
        train_ended = time.time()
        code = watcher.wait(timeout=300)
    plain_after = train(tmp / "plain-after", size, [])
    inline_cb = callback("inline")
    inprocess = train(tmp / "inprocess", size, [inline_cb])

    neighbour = busy_neighbour(tmp / "plain-busy-neighbour", size, watch_core) if args.control else None

    plain = min(plain_before, plain_after, key=lambda t: t.wall)
    plain_on_core = min(plain_before, plain_after, key=lambda t: t.wall - t.wait)
    announced = read_announcements(run_dir / "uma", run_dir)
    run = announced.run.run if announced.run is not None else None
    watched = [r for r in Journal(run_dir / "uma").records() if r.run == run]
    saves = sorted(announced.checkpoints)
    lags = {s: watcher.logged[s] - announced.checkpoints[s].time for s in saves if s in watcher.logged}
    ml_run = (announced.run.trackers.get("mlflow") or {}).get("run") if announced.run is not None else None
    once = mlflow_once_per_step(uri, ml_run, watched) if ml_run else False
    diff = max_rel_diff(values(watched), values(inline_cb.records))
    uma_seconds = asynchronous.hooks.get("UMACallback", 0.0)
    uma_save_seconds = asynchronous.hooks.get("UMACallback.on_save", 0.0)
    mlflow_hooks = {name: t.hooks.get("MLflowCallback", 0.0) for name, t in
                    (("plain", plain), ("async", asynchronous), ("in process", inprocess))}  # fmt: skip

    print(f"model: Qwen2 hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; batch {size['batch']} x "
          f"{size['seq']} tokens; {size['steps']} steps, saves at {saves}; probe {size['probe']}; metrics {METRICS}")
    print(f"cores: training {train_core}, watcher {watch_core}; one MLflow SQLite store (report_to mlflow) in all cases; "
          "plain = the faster of the two plain runs")
    print("train() seconds:")
    for name, timing in (("plain before", plain_before), ("async", asynchronous), ("plain after", plain_after),
                         ("in process", inprocess)):  # fmt: skip
        print(f"  {name:13s} {timing.describe()}")
    if neighbour is not None:
        print(f"  plain beside a busy loop on core {watch_core}: {neighbour.describe()}")
    print(f"async callback: {uma_seconds:.3f} s in its event handlers, {uma_save_seconds:.3f} s of it at the saves; MLflow callback: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in mlflow_hooks.items()))
    print(f"watcher: exit code {code}, ran on cores {sorted(watcher.cores)}, {len(watched)} record(s), "
          f"MLflow keys once per step at the saves: {once}; "
          f"done {watcher.ended - train_ended:.1f} s after the training ended")
    if code != 0 or len(lags) != len(saves):
        print("watcher output (last lines):\n  " + "\n  ".join(watcher.lines[-20:]))
    print(f"script: {warmed - bench_started:.1f} s to set up and warm up, {time.perf_counter() - bench_started:.1f} s in all")
    print(f"plain_train_seconds={plain.wall:.3f}")
    print(f"async_train_seconds={asynchronous.wall:.3f}")
    print(f"inprocess_train_seconds={inprocess.wall:.3f}")
    print(f"async_train_overhead={asynchronous.wall / plain.wall - 1:.4f}")
    print(f"async_train_overhead_excluding_core_wait={ratio(asynchronous, plain_on_core) - 1:.4f}")
    if neighbour is not None:
        print(f"busy_neighbour_train_overhead={neighbour.wall / plain.wall - 1:.4f}")
        print(f"async_train_overhead_vs_busy_neighbour={asynchronous.wall / neighbour.wall - 1:.4f}")
    print(f"async_callback_seconds={uma_seconds:.4f}")
    print(f"async_callback_seconds_per_save={uma_save_seconds / max(len(saves), 1):.4f}")
    print(f"inprocess_train_overhead={inprocess.wall / plain.wall - 1:.4f}")
    print(f"inprocess_train_overhead_excluding_core_wait={ratio(inprocess, plain_on_core) - 1:.4f}")
    for step in saves:
        print(f"watch_lag_seconds_step_{step}={lags[step]:.2f}" if step in lags else f"watch_lag_seconds_step_{step}=nan")
    print(f"watch_lag_seconds_max={max(lags.values()) if len(lags) == len(saves) and lags else math.nan:.2f}")
    print(f"watch_total_seconds={watcher.ended - watcher.started:.2f}")
    print(f"watch_after_train_seconds={watcher.ended - train_ended:.2f}")
    print(f"watch_exit_code={code}")
    print(f"async_equals_inprocess_max_rel_diff={diff:.3g}")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
