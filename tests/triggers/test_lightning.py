"""UMALightningCallback on a real ``lightning.Trainer`` (CPU) training the tiny Qwen2, checkpoints every 2 steps."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.mlflow_store import mlflow_store
from tests.trainer_cases import tiny_lm, tiny_lm_dataset

# lightning is imported by the tests that run it, not at collection: every test worker collects
# every module, and importing lightning costs 2.6 s
if importlib.util.find_spec("lightning") is None:
    pytest.skip("needs lightning (the [lightning] extra)", allow_module_level=True)
pytestmark = pytest.mark.slow


@functools.cache
def tiny_lm_module() -> type:
    """``TinyLM``: a LightningModule wrapping the tiny Qwen2 (``self.model``: the module measured by default)."""
    import lightning as L

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_lm()

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return TinyLM


def loader():
    from transformers import default_data_collator

    return torch.utils.data.DataLoader(tiny_lm_dataset(n=16), batch_size=4, collate_fn=default_data_collator)


def fit(root, callbacks=(), loggers=False, max_steps=4, ckpt_path=None, module=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = module or tiny_lm_module()()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=loggers, default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2, save_top_k=-1), *callbacks],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    return trainer, module


def test_measures_each_checkpoint_into_the_loggers_runs_and_trains_as_without_it(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing import event_accumulator as ea

    from uma_callbacks.triggers.lightning import UMALightningCallback

    uri = mlflow_store(tmp_path)
    tb = TensorBoardLogger(save_dir=str(tmp_path / "tb"), name="lit")
    mlf = MLFlowLogger(experiment_name="lit", tracking_uri=uri)
    callback = UMALightningCallback(metrics=["gradient_flow"], probe_size=8, draw_figures=False, seed=0)
    _, module = fit(tmp_path / "run", [callback], loggers=[tb, mlf])

    assert [(r.step, r.metric, r.status) for r in callback.records] == [(2, "gradient_flow", "ok"), (4, "gradient_flow", "ok")]
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert (tmp_path / "run" / "uma" / "journal.jsonl").is_file()
    values = {r.step: r.scalars["total_norm"] for r in callback.records}
    # the MLflow logger's own run, at the checkpoints' steps
    history = MlflowClient(uri).get_metric_history(mlf.run_id, "uma/gradient_flow/total_norm")
    assert sorted(m.step for m in history) == [2, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([values[2], values[4]], rel=1e-6)
    assert {r.info.run_id for r in MlflowClient(uri).search_runs([mlf.experiment_id])} == {mlf.run_id}  # no run of our own
    # the TensorBoard logger's log_dir: its events and ours, one run
    acc = ea.EventAccumulator(tb.log_dir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    assert "train_loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("uma.gradient_flow/total_norm")] == [2, 4]
    assert [e.value for e in acc.Scalars("uma.gradient_flow/total_norm")] == pytest.approx([values[2], values[4]], rel=1e-6)
    assert [h.step for h in acc.Histograms("uma.gradient_flow/modules/norm")] == [2, 4]

    # the same training without the callback ends with the same weights, bit for bit
    _, plain = fit(tmp_path / "plain")
    for (name, a), (_, b) in zip(module.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_resumed_fit_continues_the_run(tmp_path):
    from uma_callbacks.triggers.lightning import UMALightningCallback

    first = UMALightningCallback(metrics=["gradient_flow"], probe_size=8, trackers=[], draw_figures=False, seed=0)
    fit(tmp_path, [first], max_steps=2)
    again = UMALightningCallback(metrics=["gradient_flow"], probe_size=8, trackers=[], draw_figures=False, seed=0)
    fit(tmp_path, [again], max_steps=4, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert again.session.run == first.session.run
    assert [(r.step, r.run) for r in again.records] == [(4, first.session.run)]
    steps = sorted((r.step, r.run) for r in again.journal.records())
    assert steps == [(2, first.session.run), (4, first.session.run)]


def test_settings_it_cannot_honour_are_refused():
    from uma_callbacks.triggers.lightning import UMALightningCallback

    with pytest.raises(ValueError, match="every_n_steps"):
        UMALightningCallback(every_n_steps=5)
    with pytest.raises(ValueError, match="measure"):
        UMALightningCallback(measure="async")
    with pytest.raises(ValueError, match="UMALightningCallback.model"):
        UMALightningCallback(model=3)


def test_importing_the_package_does_not_import_lightning():
    code = "import sys, uma_callbacks, uma_callbacks.triggers.trainer; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
