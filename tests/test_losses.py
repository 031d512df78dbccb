"""Per-sample loss adapters against direct cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uma_callbacks.core.losses import causal_lm_per_sample_loss, classification_per_sample_loss, hf_per_sample_loss


def test_causal_lm_loss_shifts_and_ignores():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 1, -100, -100, -100]])
    got = causal_lm_per_sample_loss(logits, labels)
    want0 = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    want1 = F.cross_entropy(logits[1, :1], labels[1, 1:2])
    assert got.tolist() == pytest.approx([want0.item(), want1.item()], rel=1e-12)


def test_all_ignored_sequence_has_zero_loss_and_no_gradient():
    logits = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.full((1, 4), -100)
    loss = causal_lm_per_sample_loss(logits, labels)
    assert loss.item() == 0.0
    loss.sum().backward()
    assert torch.all(logits.grad == 0)


def test_classification_and_regression():
    logits = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    assert torch.allclose(classification_per_sample_loss(logits, labels), F.cross_entropy(logits, labels, reduction="none"))
    pred = torch.randn(3, 1, dtype=torch.float64)
    target = torch.randn(3, dtype=torch.float64)
    assert torch.allclose(classification_per_sample_loss(pred, target), (pred[:, 0] - target) ** 2)


def test_hf_loss_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        hf_per_sample_loss(torch.nn.Identity(), {"input_ids": torch.zeros(1, 2)})


def test_labels_the_head_cannot_score_are_a_clear_error():
    from transformers import BertConfig, BertForSequenceClassification

    from uma_callbacks.metrics import GradientFlow

    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    ids = torch.randint(1, 30, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 5, 1])}
    with pytest.raises(ValueError, match=r"labels range over \[0, 5\].*2 outputs \(config.num_labels\)"):
        GradientFlow().compute(model, [batch])
    from uma_callbacks.core.losses import check_labels_fit

    check_labels_fit(model, [dict(batch, labels=torch.tensor([0, 1, -100, 0]))])  # fits (-100 ignored): no error
