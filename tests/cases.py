"""Tiny models and probes shared by the tests (float64 where compared with oracles)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from uma_callbacks.core.losses import hf_per_sample_loss
from uma_callbacks.engine.probe import count_samples, select_samples


def split_samples(batch: Any) -> list[Any]:
    """One batch of B samples -> B batches of one sample each."""
    return [select_samples(batch, [i]) for i in range(count_samples(batch))]


class TinyMLP(torch.nn.Module):
    """3 -> 5 -> 4 -> 2 with tanh; a few dozen parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 5)
        self.fc2 = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Custom per-sample loss: squared error summed over outputs, [B]."""
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(dim=-1)


def mlp_case(dtype: torch.dtype = torch.float64, n_batches: int = 2, batch_size: int = 5, seed: int = 0):
    """``(model, batches, loss_fn)`` for the MLP with a custom loss."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyMLP().to(dtype)
    batches = [
        {"x": torch.randn(batch_size, 3, generator=gen, dtype=dtype), "y": torch.randn(batch_size, 2, generator=gen, dtype=dtype)}
        for _ in range(n_batches)
    ]
    return model, batches, mlp_loss


def tiny_qwen2(dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "sdpa", vocab: int = 40):
    """A Qwen2ForCausalLM built from config: hidden 16, 2 layers, 2 heads (a few thousand params)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    model = Qwen2ForCausalLM(config).to(dtype)
    # give the zero-initialised q/k/v biases some values so their gradients are generic
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def ragged_lm_batches(vocab: int = 40, seed: int = 0, n_batches: int = 2, batch_size: int = 3, max_len: int = 9):
    """Causal-LM batches with right padding of different lengths (labels -100 on pads)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        ids = torch.randint(1, vocab, (batch_size, max_len), generator=gen)
        lengths = [max_len - ((b + i) % 4) for i in range(batch_size)]
        mask = torch.zeros(batch_size, max_len, dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def qwen2_case(dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "sdpa"):
    """``(model, batches, loss_fn)`` for a tiny Qwen2 with ragged padded sequences."""
    return tiny_qwen2(dtype, seed, attn), ragged_lm_batches(seed=seed), hf_per_sample_loss


@dataclass
class Case:
    name: str
    build: Callable[..., tuple[torch.nn.Module, list[Any], Callable]]

    def __str__(self) -> str:
        return self.name


TINY_CASES = [Case("mlp_custom_loss", mlp_case), Case("qwen2_ragged", qwen2_case)]


def bert_case(dtype: torch.dtype = torch.float64, seed: int = 0):
    """``(model, batches, loss_fn)``: a tiny BERT sequence classifier on padded batches with masks."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([7, 5, 3], [7, 7, 2]):
        ids = torch.randint(1, 30, (3, 7), generator=gen)
        mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (3,), generator=gen)})
    return model, batches, hf_per_sample_loss
