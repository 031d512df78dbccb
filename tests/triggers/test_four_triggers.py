"""The four triggers share one session: same checkpoints, same values.

The three-trigger run (tests/triggers/test_three_triggers.py: a tiny Qwen2 trained with the
Trainer callback, checkpoints at steps 2, 4, 6) goes through the Accelerate hook, the
backfill, and a real ``lightning.Trainer`` whose ``ModelCheckpoint`` saves every 2 steps a
model that holds the Trainer's checkpoint of that step (``UMALightningCallback`` builds its
probe from the same dataset itself). Values equal to 1e-6 across the four; pair metrics
(``interpolation``, ``trajectory``) from the second checkpoint on.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.trainer_cases import tiny_lm, tiny_lm_dataset
from tests.triggers.test_three_triggers import NAMES, STEPS, _assert_same, _values, live, registered  # noqa: F401
from uma_callbacks.checkpoints import load_into, load_weights

if importlib.util.find_spec("lightning") is None:  # imported by the test (2.6 s), not at collection
    pytest.skip("needs lightning (the [lightning] extra)", allow_module_level=True)
pytestmark = pytest.mark.slow


def _replay(run):
    """A LightningModule whose weights after optimizer step N are the Trainer's checkpoint-N (when there is one)."""
    import lightning as L

    class Replay(L.LightningModule):
        def __init__(self, run):
            super().__init__()
            self.model = tiny_lm()
            self.run = run
            self.steps = 0

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure)
            self.steps += 1
            folder = self.run / f"checkpoint-{self.steps}"
            if folder.is_dir():
                load_into(self.model, load_weights(folder))

    return Replay(run)


def _lightning_records(run, out):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import default_data_collator

    from uma_callbacks.triggers.lightning import UMALightningCallback

    callback = UMALightningCallback(metrics=NAMES, probe=tiny_lm_dataset(n=8, seed=3), probe_size=8, trackers=[],
                                    draw_figures=False, seed=0)  # fmt: skip
    loader = torch.utils.data.DataLoader(tiny_lm_dataset(n=32), batch_size=4, collate_fn=default_data_collator)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS[-1], logger=False, default_root_dir=str(out),
        callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=2, save_top_k=-1), callback],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_replay(run), train_dataloaders=loader)
    return callback


def _accelerate_records(run, probe, out):
    from accelerate import Accelerator

    from uma_callbacks import attach

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_lm())
    handle = attach(accelerator, NAMES, probe, trackers=[], output_dir=str(out / "uma"), draw_figures=False, seed=0)
    for step in STEPS:
        load_into(accelerator.unwrap_model(model), load_weights(run / f"checkpoint-{step}"))
        handle.step = step
        accelerator.save_state(str(out / f"checkpoint-{step}"))
    handle.remove()
    return handle.records


def test_trainer_accelerate_backfill_and_lightning_give_the_same_values(live, tmp_path):  # noqa: F811 (the imported fixture)
    from uma_callbacks.triggers.backfill import backfill

    run, callback = live
    want = _values(callback.records)
    assert {step for step, metric in want if metric == "interpolation"} == set(STEPS[1:])

    lit = _lightning_records(run, tmp_path / "lightning")
    assert lit.probe.fingerprint == callback.probe.fingerprint  # drawn from the same dataset, collated alike
    status = {(r.step, r.metric): r.status for r in lit.records}
    assert status[(STEPS[0], "interpolation")] == "skipped" and status[(STEPS[0], "trajectory")] == "skipped"
    assert sorted({r.step for r in lit.records}) == list(STEPS)

    summary = backfill(run, metrics=NAMES, output_dir=str(tmp_path / "backfill"), use_cache=False, trajectory=False,
                       draw_figures=False, progress=False, check_probe=False)  # fmt: skip
    assert summary.ok, summary.describe()
    acc = _accelerate_records(run, callback.probe, tmp_path / "acc")

    for got in (_values(lit.records), _values(summary.records), _values(acc)):
        _assert_same(got, want)
