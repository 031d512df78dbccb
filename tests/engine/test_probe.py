"""Probe: frozen, seeded, fingerprinted; sharding covers the probe exactly."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks.engine.probe import Probe, count_samples, pad_collate, split_batch


def test_from_dataset_is_seeded_and_frozen():
    ds = tiny_lm_dataset(n=40)
    a = Probe.from_dataset(ds, size=10, batch_size=4, seed=7)
    b = Probe.from_dataset(ds, size=10, batch_size=4, seed=7)
    c = Probe.from_dataset(ds, size=10, batch_size=4, seed=8)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.n_samples == 10 and [count_samples(x) for x in a.batches] == [4, 4, 2]


def test_fingerprint_changes_when_one_token_changes():
    batch = {"input_ids": torch.arange(12).reshape(3, 4), "labels": torch.arange(12).reshape(3, 4)}
    before = Probe([batch]).fingerprint
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][2, 3] += 1
    assert Probe([changed]).fingerprint != before
    assert Probe([batch]).fingerprint == before


def test_pad_collate_pads_labels_with_ignore_index():
    out = pad_collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_partition_the_probe(world):
    batch = {"x": torch.arange(7).unsqueeze(1), "y": torch.arange(7)}
    probe = Probe([batch, {"x": torch.arange(7, 10).unsqueeze(1), "y": torch.arange(7, 10)}])
    seen = sorted(int(v) for r in range(world) for b in probe.shard(r, world) for v in b["y"])
    assert seen == list(range(10))


def test_split_batch_chunks():
    batch = {"x": torch.zeros(5, 2)}
    assert [count_samples(c) for c in split_batch(batch, 2)] == [2, 2, 1]


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_probe_size(size):
    with pytest.raises(ValueError, match="probe_size"):
        Probe.from_dataset(tiny_lm_dataset(n=4), size=size)


def test_empty_probe_refused():
    with pytest.raises(ValueError, match="probe"):
        Probe([])
    with pytest.raises(ValueError, match="probe"):
        Probe.from_dataset([], size=3)


def test_from_texts_masks_padding():
    class Tok:
        def __call__(self, texts, **kw):
            lengths = [len(t) for t in texts]
            width = max(lengths)
            ids = torch.tensor([[ord(c) % 50 for c in t] + [0] * (width - len(t)) for t in texts])
            mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
            return {"input_ids": ids, "attention_mask": mask}

    probe = Probe.from_texts(["abc", "a"], Tok())
    assert probe.batches[0]["labels"].tolist()[1] == [ord("a") % 50, -100, -100]
