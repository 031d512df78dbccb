"""SIGINT mid-metric, N trials in one process (tests/reliability/test_held_attacks.py).

A tiny Qwen2 is measured by three metrics once (the baseline, and each metric's duration);
then trial i sends SIGINT to this process at a fraction of one metric's duration after that
metric starts computing (the metrics in turn, the fractions spread over (0, 1)). For each
trial this prints one JSON line: whether it was interrupted, the journal as read back by a
fresh reader, and whether the model, its hooks, grad mode, the RNG and the SIGTERM handler
are as they were; every result the trial completed is compared with the baseline's.

Usage: python sigint_trials.py <journal folder> <trials>
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import torch

from tests.cases import qwen2_case
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe
from uma_callbacks.engine.suite import MetricSuite
from uma_callbacks.metrics import METRICS


def hooks(model: torch.nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    count = sum(len(getattr(m, n, {}) or {}) for m in model.modules() for n in names)
    return count + sum(len(p._backward_hooks or {}) for p in model.parameters())


def main() -> None:
    root, trials = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    # a process started in the background (a CI runner, `cmd &`) inherits SIGINT ignored:
    # these trials are about Python's own handler, so put it back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model, batches, loss_fn = qwen2_case(dtype=torch.float32)
    probe = Probe(batches)
    metrics = [METRICS["gradient_flow"](), METRICS["hessian"](top_k=1, hutchinson_samples=2, max_iter=3), METRICS["fisher"](top_k=2)]
    suite = MetricSuite(metrics, journal=Journal(root), loss_fn=loss_fn, draw_figures=False, use_cache=False)
    params = dict(model.named_parameters())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in params.items()}
    modes = [m.training for m in model.modules()]
    n_hooks = hooks(model)
    sigterm = signal.getsignal(signal.SIGTERM)

    target: dict[str, object] = {}
    for cls in {type(m) for m in metrics}:  # start the trial's timer when its metric starts
        def compute(self, ctx, _inner=cls._compute):
            if target.get("metric") == self.name:
                target["timer"].start()
            return _inner(self, ctx)

        cls._compute = compute
    suite.run(model, probe, step=-1)  # warm-up: the first run plans and builds caches
    started = time.perf_counter()
    first = suite.run(model, probe, step=0)
    took = time.perf_counter() - started
    baseline = {r.metric: (r.status, r.scalars) for r in first}
    seconds = {r.metric: round(r.meta.get("seconds", 0.0), 4) for r in first}
    print(json.dumps({"baseline_seconds": took, "metric_seconds": seconds}), flush=True)

    for i in range(trials):
        step = i + 1
        rng = torch.get_rng_state()
        name = sorted(seconds)[i % len(seconds)]
        fraction = (i // len(seconds) + 0.5) / -(-trials // len(seconds))
        timer = threading.Timer(seconds[name] * fraction, os.kill, (os.getpid(), signal.SIGINT))
        target.update(metric=name, timer=timer)
        outcome = "completed"
        try:
            suite.run(model, probe, step=step)
            timer.cancel()
            if timer.is_alive():
                timer.join()
            time.sleep(0.002)  # a signal already sent lands here, inside the try
        except KeyboardInterrupt:
            outcome = "interrupted"
        timer.cancel()
        if timer.is_alive():
            timer.join()
        target.clear()
        journal = Journal(root)
        records = journal.records()
        mine = [r for r in records if r.step == step]
        same_values = all((r.status, r.scalars) == baseline[r.metric] for r in mine)
        current = dict(model.named_parameters())
        print(json.dumps({
            "trial": i,
            "metric": name,
            "fraction": round(fraction, 3),
            "outcome": outcome,
            "bad_lines": journal.bad_lines,
            "records": [[r.metric, r.status] for r in mine],
            "same_values": same_values,
            "same_objects": all(current[k] is p for k, p in params.items()),
            "same_weights": all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()),
            "same_flags": all(p.requires_grad == flags[k] and p.grad is None for k, p in current.items()),
            "same_modes": [m.training for m in model.modules()] == modes,
            "same_hooks": hooks(model) == n_hooks,
            "grad_enabled": torch.is_grad_enabled(),
            "same_rng": torch.equal(rng, torch.get_rng_state()),
            "same_sigterm": signal.getsignal(signal.SIGTERM) is sigterm,
        }), flush=True)
    target.clear()
    # the same process goes on: one more full measurement gives the baseline's values
    final = {r.metric: (r.status, r.scalars) for r in suite.run(model, probe, step=trials + 1)}
    print(json.dumps({"final_same": final == baseline}), flush=True)


if __name__ == "__main__":
    main()
