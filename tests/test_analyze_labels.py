"""analyze_models on a classification head: text rows keep their labels, every metric has an
entry (an error entry when it fails), and results are filed at the checkpoints' own steps."""

from __future__ import annotations

import json

import pytest
import torch

from uma_callbacks import ResultCache, UnifiedConfig, analyze_models

transformers = pytest.importorskip("transformers")
WORDS = "to be or not that is the question all world a stage and men women merely players".split()
TEXTS = ["to be or not to be", "all the world is a stage", "and all the men and women", "merely players",
         "that is the question", "the world is a stage"]


def _classifier_run(root, steps=(40, 80)):
    """``checkpoint-<N>/`` folders of a tiny BertForSequenceClassification, with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root.mkdir(parents=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32, num_labels=2)
    folders = []
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        folder = root / f"checkpoint-{step}"
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        folders.append(str(folder))
    return folders


def _config(tmp_path, **kwargs):
    return UnifiedConfig(compute_fisher=True, compute_gradients=True, compute_loss_landscape=True, fisher_top_k=2,
                         loss_landscape_n_points=3, num_samples=6, batch_size=3, max_seq_length=8, verbose=False,
                         output_dir=str(tmp_path / "out"), **kwargs)


def test_text_rows_with_labels_keep_them_and_results_sit_at_the_checkpoints_steps(tmp_path):
    folders = _classifier_run(tmp_path / "run")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "labels": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    results = analyze_models(folders, _config(tmp_path, dataset_name=str(data)))
    for path, step in zip(folders, (40, 80)):
        model = results.models[path]
        assert model.step == step
        for name in ("fisher_information", "gradient_flow", "loss_landscape_2d"):
            assert "error" not in model.metrics[name], model.metrics[name]
        assert model.metrics["fisher_information"]["trace"] > 0
    journal = ResultCache(tmp_path / "out" / "cache").journal
    assert sorted({r.step for r in journal.records()}) == [40, 80]
    # the probe measured on holds the rows' class ids (one per row), not token labels
    probe = _probe(tmp_path)
    assert results.probe_fingerprint == probe.fingerprint
    assert all(b["labels"].dim() == 1 for b in probe.batches)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [saved["models"][p]["step"] for p in folders] == [40, 80]
    # the same rows given as dataset= (with "label", as GLUE names it) give the same values
    again = analyze_models(folders, _config(tmp_path, use_cache=False),
                           dataset=[{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    for path in folders:
        assert again.models[path].metrics["fisher_information"]["trace"] == pytest.approx(
            results.models[path].metrics["fisher_information"]["trace"], rel=1e-6)


def _probe(tmp_path):
    from transformers import AutoTokenizer

    from uma_callbacks.engine.probe import Probe, pad_collate
    from uma_callbacks.legacy.analyze import TokenisedRows

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "checkpoint-40"), local_files_only=True)
    rows = TokenisedRows([{"text": t, "labels": i % 2} for i, t in enumerate(TEXTS)], tok, 8)
    return Probe.from_dataset(rows, 6, batch_size=3, seed=42, collate_fn=pad_collate)


def test_every_failing_metric_is_an_error_entry_never_a_key_error(tmp_path):
    folders = _classifier_run(tmp_path / "run", steps=(40,))
    rows = [{"text": t, "labels": 7} for t in TEXTS]  # a class the 2-class head does not have
    results = analyze_models(folders, _config(tmp_path), dataset=rows)
    metrics = results.models[folders[0]].metrics
    for name in ("fisher_information", "gradient_flow", "loss_landscape_2d"):
        assert "error" in metrics[name], (name, metrics[name])
    with pytest.raises(RuntimeError, match="metric\\(s\\) failed"):
        analyze_models(folders, _config(tmp_path, skip_on_error=False, use_cache=False), dataset=rows)
