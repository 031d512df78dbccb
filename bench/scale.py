"""Scale on this machine: a GPT-2 of 124M parameters, every metric's peak against its plan within 6 GiB.

A ``GPT2LMHeadModel`` built from ``GPT2Config()``'s defaults (124.4M parameters, random
weights, nothing downloaded; ``--quick``: 6 layers of width 384, 30.3M), a probe of one batch
of seeded random tokens (8 samples x 128 tokens; ``--quick``: 8 x 64), measured at one
checkpoint through the session API (``Session`` over ``UMAConfig(memory_budget=6)``):

- the five metrics named in the contract, ``gradient_flow``, ``fisher``, ``interpolation`` at
  their defaults, ``hessian`` and ``landscape`` cut to a few products and grid points
  (:data:`SETTINGS`: at their defaults they take hours on two cores at this size);
- the three that cost a forward or less: ``optimizer_state``, ``weight_spectra``, ``sharpness``;
- ``representations`` and ``information``.

Each metric runs in its own child process (peaks are per process, under
:data:`~bench.child_peaks.MEMORY_ENV`), which builds the model, lets a session keep it as
the previous checkpoint (step 0), takes two AdamW steps on the probe batch (the second is
the timed training step) and measures it at step 2 with the optimizer. From the record:
the planner's prediction (``planned_peak_bytes`` = fixed + per-sample bytes x chunk) against
the measured peak (``peak_bytes``, the engine's own meter), seconds, and seconds over the
child's training step. A forward pre-hook on the model counts the samples it forwards
during the measurement (the planner's one-sample measurement included): ``probe forwards``
= samples forwarded / probe samples.

Targets: no peak over the budget; the plan within 25% of the peak (|planned / peak - 1|
<= 0.25) for every per-sample metric (its memory mode holds per-sample gradients:
``gradient_flow``, ``fisher``); the three new metrics at most 12 probe forwards together;
``--quick`` under 5 minutes. A child whose resident set passes :data:`RSS_CAP_GB` is
stopped (a plan far under its peak must not take the machine down) and its row says so.

Run: ``python bench/scale.py [--quick] [--metrics a,b] [--jobs 1] [--threads 2]`` (``--quick``:
two children at a time, one thread each); prints a table, then ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child_peaks import MEMORY_ENV  # noqa: E402

BUDGET_GB = 6
DEFAULT_METRICS = ("gradient_flow", "fisher", "hessian", "landscape", "interpolation")
NEW_METRICS = ("optimizer_state", "weight_spectra", "sharpness")
METRIC_NAMES = DEFAULT_METRICS + NEW_METRICS + ("representations", "information")
#: what differs from a metric's defaults, for time (the Hessian's Lanczos basis of max_iter + 2 vectors shrinks too)
SETTINGS = {
    "hessian": {"top_k": 1, "max_iter": 3, "hutchinson_samples": 2},
    "landscape": {"n_points": 3},
}
#: ``GPT2Config`` overrides, probe samples, tokens per sample
MODELS = {
    "gpt2_124m": ({}, 8, 128),
    "gpt2_30m": ({"n_embd": 384, "n_layer": 6, "n_head": 6}, 8, 64),
}
PLAN_TOLERANCE = 0.25
#: a child past this resident set is stopped: the budget plus the model, AdamW's state and the interpreter
RSS_CAP_GB = BUDGET_GB + 6
NEW_METRICS_MAX_FORWARDS = 12
QUICK_MAX_SECONDS = 300


def build(size: str, seed: int = 0):
    """``(model, [batch])``: the GPT-2 of ``size`` with seeded random weights, one probe batch of random tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    overrides, n, length = MODELS[size]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**overrides))
    ids = torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed + 1))
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


class ForwardCounter:
    """Counts the model's forward calls and the samples they carry (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.samples = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.samples += int(ids.shape[0]) if ids is not None else 0

    def remove(self) -> None:
        self._handle.remove()


def child(name: str, size: str, threads: int) -> dict:
    """Measure ``name`` on the model of ``size`` through a session; the record's figures as a dict."""
    import torch

    from uma_callbacks.config import UMAConfig
    from uma_callbacks.session import Session

    torch.set_num_threads(threads)
    model, batches = build(size)
    config = UMAConfig(
        metrics=[{"name": name, **SETTINGS.get(name, {})}], memory_budget=BUDGET_GB, probe_size=len(batches[0]["input_ids"]),
        probe_batch_size=len(batches[0]["input_ids"]), trackers=[], draw_figures=False, use_cache=False, timeout_seconds=None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        session = Session(config, root, source="bench")
        session.start(batches)
        session.measure(model, 0, only=())  # the previous checkpoint (interpolation, sharpness's update)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        step_seconds = []
        for _ in range(2):
            started = time.perf_counter()
            model(**batches[0]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - started)
        model.eval()
        counter = ForwardCounter(model)
        started = time.perf_counter()
        (record,) = session.measure(model, 2, optimizer=optimizer)
        wall = time.perf_counter() - started
        counter.remove()
        session.finish()
    meta = record.meta
    costs = dict(session.config.metric_objects[0].memory_modes())
    return {
        "per_sample_grads": bool(getattr(costs.get(meta.get("memory_mode")), "per_sample_grads", False)),
        "metric": name, "status": record.status, "seconds": meta.get("seconds", wall), "wall": wall,
        "step": step_seconds[-1], "peak": meta.get("peak_bytes"), "planned": meta.get("planned_peak_bytes"),
        "budget": meta.get("budget_bytes"), "per_sample": meta.get("planned_per_sample_bytes", 0),
        "fixed": meta.get("planned_fixed_bytes"), "chunk": meta.get("chunk_size"), "mode": meta.get("memory_mode", "-"),
        "sample_bytes": meta.get("measured_sample_bytes"), "calls": counter.calls,
        "forwards": counter.samples / len(batches[0]["input_ids"]),
        "params": sum(p.numel() for p in model.parameters()),
        "error": (record.error or {}).get("message", "")[:300],
    }  # fmt: skip


def run_child(name: str, size: str, threads: int) -> dict:
    """One metric in a fresh process under :data:`MEMORY_ENV`, stopped past :data:`RSS_CAP_GB`; its row."""
    cmd = [sys.executable, __file__, "--child", name, "--size", size, "--threads", str(threads)]
    env = dict(os.environ, **MEMORY_ENV, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        capped = False
        while proc.poll() is None:
            if rss_bytes(proc.pid) > RSS_CAP_GB * 2**30:
                proc.kill()
                capped = True
            time.sleep(0.5)
        out.seek(0), err.seek(0)
        rows = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
        if capped or proc.returncode != 0 or not rows:
            why = f"stopped: resident set over {RSS_CAP_GB} GiB" if capped else err.read()[-300:]
            return {"metric": name, "status": "crashed", "error": why}
    return rows[-1]


def rss_bytes(pid: int) -> int:
    """The resident set of process ``pid`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def ratio(row: dict) -> float | None:
    """Planned bytes over the measured peak (``None`` without a plan or a peak)."""
    return row["planned"] / row["peak"] if row.get("planned") and row.get("peak") else None


def plan_error(row: dict) -> float:
    """|planned / peak - 1| (infinite without a plan)."""
    q = ratio(row)
    return abs(q - 1) if q is not None else float("inf")


def table(rows: list[dict], size: str) -> str:
    """The readable table: one line per metric."""
    mib = 2**20
    head = (
        f"{size}: {rows[0].get('params', 0) / 1e6:.1f}M parameters, probe {MODELS[size][1]} x {MODELS[size][2]} tokens, "
        f"budget {BUDGET_GB} GiB\n"
        "| metric | mode, chunk | planned MiB | peak MiB | planned / peak | seconds | over one training step | probe forwards | status |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if r["status"] == "crashed" or r.get("peak") is None:
            lines.append(f"| `{r['metric']}` | | | | | | | | {r['status']}: {r['error']!r} |")
            continue
        q = ratio(r)
        planned = f"{r['planned'] / mib:.0f}" if r.get("planned") else "-"
        lines.append(
            f"| `{r['metric']}`{' (per-sample)' if r['per_sample_grads'] else ''} | {r['mode']}, {r['chunk']} | {planned} | {r['peak'] / mib:.0f} | "
            f"{'-' if q is None else f'{q:.2f}'} | {r['seconds']:.1f} | {r['seconds'] / r['step']:.1f} | "
            f"{r['forwards']:.2f} | {r['status']}{' ' + r['error'] if r['error'] else ''} |"
        )
    return "\n".join(lines)


def figures(rows: list[dict], size: str, seconds: float, quick: bool, load: tuple[float, float]) -> list[str]:
    """The ``name=value`` lines, targets last; ``load``: the 1-minute load average at the start and the end."""
    done = [r for r in rows if r["status"] != "crashed" and r.get("peak") is not None]
    out = [f"{size}_train_step_seconds={min(r['step'] for r in done):.3f}"] if done else []
    for r in done:
        key = f"{size}_{r['metric']}"
        q = ratio(r)
        out += [f"{key}_planned_bytes={r['planned'] or 0}", f"{key}_peak_bytes={r['peak']}"]
        out += [f"{key}_planned_over_peak={q:.3f}"] if q is not None else []
        out += [f"{key}_seconds={r['seconds']:.2f}", f"{key}_over_train_step={r['seconds'] / r['step']:.2f}"]
        out += [f"{key}_probe_forwards={r['forwards']:.3f}"]
    budget = BUDGET_GB * 2**30
    per_sample = [r for r in done if r["per_sample_grads"]]
    new = [r for r in done if r["metric"] in NEW_METRICS]
    out += [
        f"{size}_max_peak_over_budget={max((r['peak'] / budget for r in done), default=0):.3f}",
        f"{size}_per_sample_max_plan_error={max((plan_error(r) for r in per_sample), default=0):.3f}",
        f"{size}_new_metrics_probe_forwards={sum(r['forwards'] for r in new):.3f}",
        f"{size}_not_measured={','.join(r['metric'] for r in rows if r not in done) or 'none'}",
        f"target_no_peak_over_budget={int(all(r['peak'] <= budget for r in done))}",
        f"target_per_sample_plan_within_25pct={int(all(plan_error(r) <= PLAN_TOLERANCE for r in per_sample))}",
        f"target_new_metrics_at_most_12_forwards={int(sum(r['forwards'] for r in new) <= NEW_METRICS_MAX_FORWARDS)}",
    ]
    if quick:
        out.append(f"target_quick_under_5_min={int(seconds < QUICK_MAX_SECONDS)}")
    return out + [f"load_average_start={load[0]:.2f}", f"load_average_end={load[1]:.2f}", f"seconds={seconds:.1f}"]


def main() -> int:
    """Run every metric in its own child, print the table and the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 30M GPT-2 and 64-token samples")
    parser.add_argument("--metrics", default=",".join(METRIC_NAMES), help="comma-separated subset")
    parser.add_argument("--jobs", type=int, help="children at a time (default 1; --quick: 2)")
    parser.add_argument("--threads", type=int, help="torch threads per child (default 2; --quick: 1)")
    parser.add_argument("--child", metavar="METRIC", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    jobs, threads = args.jobs or (2 if args.quick else 1), args.threads or (1 if args.quick else 2)
    if args.child:
        print(json.dumps(child(args.child, args.size, threads)), flush=True)
        return 0
    size = "gpt2_30m" if args.quick else "gpt2_124m"
    names = [m for m in args.metrics.split(",") if m]
    started, load = time.perf_counter(), os.getloadavg()[0]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = []
        for row in pool.map(lambda name: run_child(name, size, threads), names):
            print(f"# {row['metric']}: {row.get('seconds', 0):.1f} s, {row['status']}", file=sys.stderr, flush=True)
            rows.append(row)
    seconds = time.perf_counter() - started
    print(table(rows, size))
    print("\n".join(figures(rows, size, seconds, args.quick, (load, os.getloadavg()[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
