"""Tokens per sample, which sets the default chunk of the per-sample metrics."""

from __future__ import annotations

import pytest
import torch

from tests.cases import TINY_CASES
from uma_callbacks.core.batches import sequence_length
from uma_callbacks.metrics import FisherInformation, GradientFlow


@pytest.mark.parametrize(
    ("batch", "tokens"),
    [
        ({"input_ids": torch.zeros(4, 128, dtype=torch.long), "attention_mask": torch.ones(4, 128)}, 128),
        ({"x": torch.zeros(32, 256), "y": torch.zeros(32, dtype=torch.long)}, 1),  # feature rows
        ({"inputs_embeds": torch.zeros(4, 64, 32)}, 64),
        (torch.zeros(8), 1),
        ((torch.zeros(8, 3), torch.zeros(8, 10, dtype=torch.long)), 10),  # ids win over features
    ],
)
def test_sequence_length(batch, tokens):
    assert sequence_length(batch) == tokens


def test_feature_rows_are_not_chunked_by_their_width():
    """A probe of 32 rows of 256 features runs in one chunk by default (its width is not a
    sequence: chunking it to 512 // 256 = 2 rows made the MLP Fisher 7x slower); token
    batches are still cut to 512 tokens."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(32, 256, generator=gen), "y": torch.randint(0, 3, (32,), generator=gen)}
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    assert FisherInformation(top_k=None).compute(model, [batch], loss).meta["chunk_size"] == 32
    assert GradientFlow().compute(model, [batch], loss).meta["chunk_size"] == 32
    qwen, batches, qloss = TINY_CASES[1].build()
    tokens = sequence_length(batches[0])
    got = GradientFlow().compute(qwen, batches, qloss).meta["chunk_size"]
    assert got == max(1, min(max(int(b["input_ids"].shape[0]) for b in batches), 512 // tokens))
