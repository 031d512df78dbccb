"""Tiny real Trainer runs for the end-to-end tests."""

from __future__ import annotations

import torch


def tiny_lm_dataset(n: int = 48, length: int = 12, vocab: int = 50, seed: int = 0):
    """A ``datasets.Dataset`` of random token rows (``input_ids`` = ``labels``)."""
    import datasets

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


def tiny_lm(vocab: int = 50, seed: int = 0):
    """A one-layer Qwen2 from config (hidden 16)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def training_args(output_dir, max_steps: int = 6, save_steps: int = 3, report_to="none", **kwargs):
    """CPU ``TrainingArguments`` that log the loss at every step."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def run_trainer(output_dir, callbacks=(), model=None, dataset=None, **kwargs):
    """Train a tiny LM; returns ``(trainer, per-step training losses)``."""
    from transformers import Trainer

    dataset = dataset if dataset is not None else tiny_lm_dataset()
    trainer = Trainer(
        model=model if model is not None else tiny_lm(),
        args=training_args(output_dir, **kwargs),
        train_dataset=dataset,
        callbacks=list(callbacks),
    )
    trainer.train()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return trainer, losses
