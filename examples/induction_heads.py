"""Watch induction heads form: a tiny Qwen2 trained on repeated random sequences.

Each training row is [BOS] + r + r with r a fresh string of ``n`` uniform random tokens: the
second copy can only be predicted by looking back at the first, which is what an induction
head does (Olsson et al. 2022). ``UMACallback(metrics=["attention"])`` measures the
attention heads at every checkpoint; the induction score of the top head (``max_induction``)
and the in-context loss drop (``icl_loss_drop``) jump together when the heads form, and
``uma report`` draws both across checkpoints.

Run (about 20 s on one CPU core)::

    python examples/induction_heads.py --output-dir /tmp/induction --steps 200 --save-every 25
    uma report /tmp/induction/uma
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

VOCAB = 32
BOS = 0


def repeated_rows(n_rows: int, n: int, seed: int) -> dict[str, list[list[int]]]:
    """``n_rows`` rows of [BOS] + r + r, r of ``n`` tokens in 1..VOCAB-1 (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(1, VOCAB, (n_rows, n), generator=gen)
    ids = torch.cat([torch.full((n_rows, 1), BOS), half, half], dim=1).tolist()
    return {"input_ids": ids, "attention_mask": [[1] * len(ids[0])] * n_rows, "labels": ids}


def tiny_qwen2(n: int, seed: int = 0) -> torch.nn.Module:
    """2 layers, hidden 32, 2 heads; positions for [BOS] + 2 n tokens; BOS = EOS = 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2 * n + 2,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS,
    )
    return Qwen2ForCausalLM(config)


def run(output_dir: str | Path, steps: int = 200, save_every: int = 25, n: int = 10, lr: float = 3e-3, seed: int = 0):
    """Train with the callback; returns ``[(step, max_induction, icl_loss_drop)]`` from the journal."""
    import datasets
    from transformers import Trainer, TrainingArguments

    from uma_callbacks import UMACallback
    from uma_callbacks.engine.journal import Journal

    output_dir = Path(output_dir)
    train = datasets.Dataset.from_dict(repeated_rows(steps * 32, n, seed))
    probe = datasets.Dataset.from_dict(repeated_rows(8, n, seed + 1))
    callback = UMACallback(metrics=["attention"], probe=probe, probe_size=8, trackers=[], output_dir=str(output_dir / "uma"))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, save_steps=save_every, per_device_train_batch_size=32,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, report_to="none", use_cpu=True,
        disable_tqdm=True, logging_steps=save_every, seed=seed, data_seed=seed, save_only_model=True,
    )
    Trainer(model=tiny_qwen2(n, seed), args=args, train_dataset=train, callbacks=[callback]).train()
    rows = []
    for record in Journal(output_dir / "uma").records():
        if record.metric == "attention" and record.status == "ok":
            rows.append((record.step, record.scalars["max_induction"], record.scalars["icl_loss_drop"]))
    return sorted(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/induction_heads")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--induction-len", type=int, default=10)
    args = parser.parse_args()
    for step, induction, drop in run(args.output_dir, args.steps, args.save_every, args.induction_len):
        print(f"step {step:5d}  max_induction {induction:.3f}  icl_loss_drop {drop:.3f} nats")


if __name__ == "__main__":
    main()
