"""A real Trainer run logging ``hessian_density``, per-layer Hessian blocks and ``influence``
to MLflow and W&B offline at once: values, figures and table artifacts read back from both."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.integrations.wandb_runfile import artifacts, history_rows, run_file, settled_records
from tests.mlflow_store import mlflow_store
from tests.trainer_cases import run_trainer, tiny_lm_dataset
from uma_callbacks.engine.journal import Journal

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

STEPS = (3, 6)
METRICS = ("hessian", "hessian_density", "influence")
#: the table files each metric's record carries
TABLES = {"hessian_density": "hessian_density.csv", "influence": "influence.csv"}


class WordTokenizer:
    """Decodes token id i as the word ``w<i>`` (the tiny model has no tokenizer of its own)."""

    name_or_path = "word-ids"

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One Trainer run (6 steps, saves at 3 and 6), ``report_to=["wandb", "mlflow"]``; W&B finished."""
    from mlflow.tracking import MlflowClient

    from uma_callbacks import UMACallback
    from uma_callbacks.metrics import HessianDensity, HessianSpectrum, ProbeInfluence

    tmp = tmp_path_factory.mktemp("curvature_tables")
    (tmp / "wb").mkdir()
    uri = mlflow_store(tmp)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"), "WANDB_SILENT": "true",
                           "WANDB_PROJECT": "uma-test", "MLFLOW_TRACKING_URI": uri,
                           "MLFLOW_EXPERIMENT_NAME": "uma-curvature"}.items():  # fmt: skip
            mp.setenv(key, value)
        wandb.teardown()  # wandb caches settings (WANDB_DIR) per process: start clean
        try:
            metrics = [
                HessianDensity(n_vectors=2, n_steps=8),
                HessianSpectrum(top_k=2, hutchinson_samples=2, blocks="layers"),
                ProbeInfluence(top_k=2, tokenizer=WordTokenizer()),
            ]
            cb = UMACallback(metrics=metrics, probe=tiny_lm_dataset(n=6, seed=1), probe_size=6, use_cache=False)
            run_trainer(tmp / "out", callbacks=[cb], report_to=["wandb", "mlflow"])
            wandb.finish()  # flushes the run file (the Trainer leaves its run open)
            journal = {(r.step, r.metric): r for r in Journal(tmp / "out" / "uma").records()}
            records = settled_records(
                tmp / "wb", lambda rows: len([r for r in rows if "uma/step" in r]) >= len(journal)
            )
        finally:
            if wandb.run is not None:
                wandb.finish()
            wandb.teardown()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("uma-curvature").experiment_id])
    assert len(runs) == 1
    return {"journal": journal, "records": records, "client": client, "run_id": runs[0].info.run_id, "wb": tmp / "wb"}


def test_every_metric_measured_at_both_saves(run):
    journal = run["journal"]
    assert sorted(journal) == sorted((s, m) for s in STEPS for m in METRICS)
    for (step, metric), record in journal.items():
        reason = record.meta.get("partial_reason", "")
        # the whole-model top-2 or a 2-probe trace of a tiny model may stay partial; never a block
        assert record.status == "ok" or (metric == "hessian" and "block" not in reason), (step, metric, record.status, reason)
    hessian = journal[(6, "hessian")]
    assert any(k.startswith("layers/") and k.endswith("/top_eigenvalue") for k in hessian.scalars)
    assert journal[(6, "influence")].scalars["n_checkpoints"] == 2.0


def test_mlflow_holds_the_scalars_and_the_table_artifacts(run):
    client, run_id, journal = run["client"], run["run_id"], run["journal"]
    for metric, key in (("hessian_density", "trace"), ("influence", "self_influence_top10_share")):
        history = client.get_metric_history(run_id, f"uma/{metric}/{key}")
        assert [(m.step, m.value) for m in history] == [(s, journal[(s, metric)].scalars[key]) for s in STEPS]
    block_key = next(k for k in journal[(6, "hessian")].scalars if k.endswith("/top_eigenvalue") and k.startswith("layers/"))
    assert [m.step for m in client.get_metric_history(run_id, f"uma/hessian/{block_key}")] == list(STEPS)
    for step in STEPS:
        files = {f.path for f in client.list_artifacts(run_id, f"uma/step-{step}")}
        for name in (*TABLES.values(), "hessian_density.png", "influence.png", "hessian-layers.png"):
            assert f"uma/step-{step}/{name}" in files, (name, sorted(files))
    local = client.download_artifacts(run_id, "uma/step-6/influence.csv")
    with open(local, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:4] == ["part", "index", "self_influence", "grad_norm"]
    assert rows[0][-1] == "text" and all(r[-1].startswith("w") for r in rows[1:])
    assert {r[0] for r in rows[1:]} == {"largest self-influence", "smallest self-influence", "largest loss", "smallest loss"}


def test_wandb_holds_the_scalars_figures_and_table_artifacts(run):
    records, journal = run["records"], run["journal"]
    uma = [r for r in history_rows(records) if "uma/step" in r]
    for step in STEPS:
        keys = {k for r in uma if r["uma/step"] == step for k in r}
        for metric, key in (("hessian_density", "trace"), ("influence", "self_influence_top10_share")):
            logged = [r[f"uma/{metric}/{key}"] for r in uma if r["uma/step"] == step and f"uma/{metric}/{key}" in r]
            assert logged == [pytest.approx(journal[(step, metric)].scalars[key], rel=1e-12)]
        assert {"uma/hessian_density/figures/hessian_density/_type", "uma/influence/figures/influence/_type"} <= keys, sorted(keys)
        assert any(k.startswith("uma/hessian/layers/") and k.endswith("/top_eigenvalue") for k in keys)
    # the record files (tables included) as one artifact per metric and step
    contents = {a.name: {entry.path for entry in a.manifest.contents} for a in artifacts(records)}
    for step in STEPS:
        for metric, table in TABLES.items():
            name = next(n for n in contents if n.endswith(f"-{metric}-step-{step}"))
            assert f"step-{step}/{table}" in contents[name], contents[name]


def _wandb_tables(run) -> dict[tuple[int, str], dict]:
    """``{(uma/step, key): table JSON}`` of every ``wandb.Table`` in the run's history rows."""
    files = run_file(run["wb"]).parent / "files"
    out = {}
    for row in history_rows(run["records"]):
        for key, value in row.items():
            if key.endswith("/_type") and value == "table-file" and "uma/step" in row:
                base = key[: -len("/_type")]
                out[(row["uma/step"], base)] = json.loads((files / row[f"{base}/path"]).read_text())
    return out


def test_wandb_holds_each_csv_as_a_table(run):
    tables = _wandb_tables(run)
    for step in STEPS:
        for metric, name in TABLES.items():
            key = next((k for s, k in tables if s == step and k.startswith(f"uma/{metric}/") and name[:-4] in k), None)
            assert key is not None, sorted(tables)
            table = tables[(step, key)]
            journal_csv = (run["wb"].parent / "out" / "uma" / f"step-{step}" / name).read_text()
            header = next(csv.reader(io.StringIO(journal_csv)))
            assert table["columns"] == header
