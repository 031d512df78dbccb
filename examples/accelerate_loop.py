"""A custom Accelerate training loop with uma-callbacks attached to ``save_state``.

A tiny Qwen2 built from its config learns random token rows (no download, a few seconds
on CPU). Every ``--save-every`` optimizer steps the loop calls ``accelerator.save_state``;
the attached hook measures the model on a frozen probe at that global step, journals the
results under ``<out>/uma`` and writes ``uma_state.json`` into the checkpoint folder.

One process::

    python examples/accelerate_loop.py --out runs/acc

Two CPU processes (DDP over gloo; ``--cpu --num_processes 2`` alone runs ONE process)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --out runs/acc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def random_token_rows(n: int, length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """``n`` causal-LM samples of random tokens (``labels`` = ``input_ids``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen).tolist()
    return [{"input_ids": row, "attention_mask": [1] * length, "labels": row} for row in ids]


def tiny_qwen2(vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    """A one-layer Qwen2ForCausalLM (hidden 16) from config, seeded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).to(dtype)


def main(argv: list[str] | None = None) -> dict:
    """Train, saving state every ``--save-every`` steps; returns the run summary (rank 0)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate_loop")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--metrics", default="gradient_flow", help="comma-separated metric names")
    parser.add_argument("--trackers", default="", help="comma-separated: wandb,mlflow (default: journal only)")
    parser.add_argument("--probe-size", type=int, default=8)
    parser.add_argument("--float64", action="store_true", help="train and measure in float64")
    args = parser.parse_args(argv)

    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from uma_callbacks import attach
    from uma_callbacks.engine.probe import pad_collate

    vocab, out = 50, Path(args.out)
    accelerator = Accelerator(cpu=True)
    dtype = torch.float64 if args.float64 else torch.float32
    model = tiny_qwen2(vocab, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = random_token_rows(64, 12, vocab, seed=0)
    loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=pad_collate, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # the probe: the same held-out rows on every rank (never a prepared DataLoader)
    probe_rows = random_token_rows(args.probe_size, 12, vocab, seed=1)
    trackers = [t for t in args.trackers.split(",") if t]
    handle = attach(
        accelerator,
        metrics=[m for m in args.metrics.split(",") if m],
        probe=probe_rows,
        probe_size=args.probe_size,
        trackers=trackers,
        output_dir=str(out / "uma"),
        draw_figures=False,
    )

    step = 0
    model.train()
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.save_every == 0:
                handle.step = step  # the global step: Accelerate's folder counter is not one
                accelerator.save_state(str(out / f"checkpoint-{step}"))
            if step >= args.steps:
                break

    summary = {
        "world_size": accelerator.num_processes,
        "records": [(r.step, r.metric, r.status, r.scalars.get("total_norm")) for r in handle.records],
    }
    handle.remove()
    accelerator.end_training()
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo may abort at exit otherwise
    return summary


if __name__ == "__main__":
    main()
