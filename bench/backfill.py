"""Backfill throughput: does loading the next checkpoint overlap measuring the current one?

Writes N checkpoints of a small Qwen2, then measures, apart, (a) loading each one
(safetensors read) and (b) computing the metrics on each one, and finally (c) the real
backfill with prefetch. Ends with ``name=value`` lines; the target is
``backfill_over_max_load_compute <= 1.1`` (wall time of the backfill over
max(total load, total compute)).

Usage::

    python bench/backfill.py --quick     # under a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from uma_callbacks.checkpoints import build_model, discover_checkpoints, load_into, load_weights  # noqa: E402
from uma_callbacks.engine.journal import Journal  # noqa: E402
from uma_callbacks.engine.probe import Probe  # noqa: E402
from uma_callbacks.engine.snapshot import weights_fingerprint  # noqa: E402
from uma_callbacks.engine.suite import MetricSuite  # noqa: E402
from uma_callbacks.metrics import GradientFlow  # noqa: E402
from uma_callbacks.triggers.backfill import backfill  # noqa: E402


def make_run(root: Path, n: int, hidden: int, layers: int, vocab: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for i in range(n):
        torch.manual_seed(i)
        folder = root / f"checkpoint-{(i + 1) * 10}"
        Qwen2ForCausalLM(config).save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": (i + 1) * 10}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--checkpoints", type=int, default=None)
    args = parser.parse_args()
    n = args.checkpoints or (5 if args.quick else 12)
    hidden, layers, vocab = (128, 2, 4000) if args.quick else (256, 4, 16000)
    probe_n = 8 if args.quick else 16
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (probe_n, 32), generator=gen)
    probe = Probe([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        make_run(root, n, hidden, layers, vocab)
        ckpts = discover_checkpoints(root)
        model = build_model(ckpts[0].path)
        # "compute" is everything the backfill does for a checkpoint once its weights are read:
        # copy them into the model, fingerprint them, measure, journal the record
        suite = MetricSuite([GradientFlow()], journal=Journal(Path(tmp) / "journal0"), use_cache=False, draw_figures=False)
        suite.run(model, probe, step=0)  # warm-up (first-call overheads)
        load_s, compute_s = [], []
        for c in ckpts:
            t = time.perf_counter()
            weights = load_weights(c.path)
            load_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            load_into(model, weights)
            suite.run(model, probe, step=c.step, checkpoint=weights_fingerprint(model))
            compute_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        backfill(root, metrics=[GradientFlow()], probe=probe, trajectory=False, draw_figures=False, progress=False,
                 output_dir=Path(tmp) / "journal2", check_probe=False, prefetch=False)
        wall_serial = time.perf_counter() - t
        t = time.perf_counter()
        summary = backfill(root, metrics=[GradientFlow()], probe=probe, trajectory=False, draw_figures=False,
                           progress=False, output_dir=Path(tmp) / "journal", check_probe=False)
        wall = time.perf_counter() - t
        assert summary.ok, summary.describe()
    params = sum(p.numel() for p in model.parameters())
    total_load, total_compute = sum(load_s), sum(compute_s)
    print(f"checkpoints={n}")
    print(f"params={params}")
    print(f"load_s_per_checkpoint={total_load / n:.4f}")
    print(f"compute_s_per_checkpoint={total_compute / n:.4f}")
    print(f"backfill_s_per_checkpoint={wall / n:.4f}")
    print(f"backfill_no_prefetch_s_per_checkpoint={wall_serial / n:.4f}")
    print(f"backfill_over_max_load_compute={wall / max(total_load, total_compute):.3f}")
    print(f"backfill_over_load_plus_compute={wall / (total_load + total_compute):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
