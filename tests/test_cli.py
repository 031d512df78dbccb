"""The ``uma`` command: help with examples, exit codes, backfill, report and sync."""

from __future__ import annotations

import base64
import re

import pytest

from tests.mlflow_store import mlflow_store
from tests.test_checkpoints import fake_trainer_run
from tests.trainer_cases import tiny_lm_dataset
from uma_callbacks.cli import build_parser, main
from uma_callbacks.engine.journal import Journal
from uma_callbacks.engine.probe import Probe, save_probe


@pytest.mark.parametrize("command", ["backfill", "report", "sync"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"uma {command}" in out


def test_missing_folder_and_empty_folder_exit_2(tmp_path, capsys):
    assert main(["backfill", str(tmp_path / "nope"), "--metrics", "fisher"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["backfill", str(tmp_path / "empty")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2


@pytest.mark.slow
def test_backfill_with_a_corrupt_checkpoint_then_report_and_sync(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = fake_trainer_run(tmp_path / "run", steps=(1, 2, 3))
    save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=5), 4), run / "uma")
    (run / "checkpoint-3" / "model.safetensors").write_bytes(b"\x01" * 64)
    code = main(["backfill", str(run), "--metrics", "gradient_flow", "--no-figures", "--probe-from-journal"])
    out = capsys.readouterr().out
    assert code == 1
    assert "error at step 3" in out and "cannot read weights" in out
    assert re.search(r"2 checkpoint|3 checkpoint", out)

    assert main(["report", str(run)]) == 0
    page = (run / "uma" / "report.html").read_text()
    png = (run / "uma" / "report.png").read_bytes()
    assert base64.b64encode(png).decode() in page
    assert "gradient_flow/total_norm" in page and "<table>" in page and "Errors" in page

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sync")).info.run_id
    assert main(["sync", str(run), "--mlflow-run", run_id, "--tracking-uri", uri]) == 0
    steps = sorted(m.step for m in client.get_metric_history(run_id, "uma/gradient_flow/total_norm"))
    assert steps == [1, 2]
    assert main(["sync", str(run), "--mlflow-run", run_id, "--tracking-uri", uri]) == 0
    assert "0 record(s) delivered" in capsys.readouterr().out
    assert sorted(m.step for m in client.get_metric_history(run_id, "uma/gradient_flow/total_norm")) == [1, 2]
    assert len(Journal(run / "uma").delivered("mlflow", run_id)) >= 3


def test_metric_options_on_the_command_line_and_in_a_file(tmp_path):
    from uma_callbacks.metric_specs import metrics_from_file, parse_metric_spec

    hessian = parse_metric_spec("hessian:top_k=2,hutchinson_samples=5")
    assert (hessian.top_k, hessian.hutchinson_samples) == (2, 5)
    pruning = parse_metric_spec("pruning:sparsities=[0.5,0.9]")
    assert list(pruning.sparsities) == [0.5, 0.9]
    assert list(parse_metric_spec("pruning:sparsities=0.5;0.8").sparsities) == [0.5, 0.8]
    with pytest.raises(ValueError, match="takes no option.*top_kk"):
        parse_metric_spec("hessian:top_kk=2")
    with pytest.raises(ValueError, match="unknown metric 'hesian'"):
        parse_metric_spec("hesian")
    with pytest.raises(ValueError, match="top_k"):
        parse_metric_spec("hessian:top_k=0")
    path = tmp_path / "metrics.json"
    path.write_text('{"metrics": {"hessian": {"top_k": 3}, "gradient_flow": {}}}')
    assert [(m.name, getattr(m, "top_k", None)) for m in metrics_from_file(path)] == [("hessian", 3), ("gradient_flow", None)]


def test_backfill_help_lists_every_metric_and_its_options(capsys):
    from uma_callbacks.metrics import METRICS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["backfill", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name}:" in out for name in METRICS) and "top_k=" in out


def test_bad_metric_option_exits_2(tmp_path, capsys):
    run = fake_trainer_run(tmp_path / "run", steps=(1,))
    assert main(["backfill", str(run), "--metric", "hessian:top_k=-1", "--no-figures"]) == 2
    assert "top_k" in capsys.readouterr().err


@pytest.mark.slow
def test_backfill_finds_the_run_opened_through_the_env_uri_and_keeps_configs_apart(tmp_path, monkeypatch, capsys):
    """The live run logged to a store named only by MLFLOW_TRACKING_URI; the CLI, without it,
    logs into that very run, and another Hessian config neither overwrites the live files nor
    the live MLflow value at the same step."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback
    from uma_callbacks.metrics import HessianSpectrum

    uri = mlflow_store(tmp_path / "elsewhere")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = tmp_path / "run"
    live = HessianSpectrum(top_k=2, hutchinson_samples=4)
    callback = UMACallback(metrics=[live], probe=tiny_lm_dataset(n=4, seed=1), probe_size=4, trackers=["mlflow"],
                           draw_figures=False)  # fmt: skip
    run_trainer(run, callbacks=[callback], max_steps=2, save_steps=2)
    run_id = callback.sinks[0].run_id()
    live_trace = MlflowClient(uri).get_metric_history(run_id, "uma/hessian/trace")[0].value
    live_json = (run / "uma" / "step-2" / "hessian.json").read_text()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    code = main(["backfill", str(run), "--trackers", "mlflow", "--metric", "hessian:top_k=1,hutchinson_samples=6",
                 "--no-trajectory", "--no-figures"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "uma/hessian/trace")] == [live_trace]
    other = [k for k in client.get_run(run_id).data.metrics if k.startswith("uma/hessian-") and k.endswith("/trace")]
    assert len(other) == 1 and client.get_metric_history(run_id, other[0])[0].step == 2
    assert (run / "uma" / "step-2" / "hessian.json").read_text() == live_json  # the live file is untouched
    assert not (run / "mlflow.db").exists() and not (run / "uma" / "mlflow.db").exists()


def test_a_failing_sink_makes_the_backfill_exit_non_zero(tmp_path, capsys):
    from uma_callbacks.integrations import Sink, register_sink
    from uma_callbacks.integrations.registry import _REGISTERED

    class Down(Sink):
        name = "down_test"

        def start(self):
            raise ConnectionError("tracker unreachable")

        def log_record(self, record, root):
            raise AssertionError("never reached")

    register_sink("down_test", Down)
    try:
        run = fake_trainer_run(tmp_path / "run", steps=(1,))
        save_probe(Probe.from_dataset(tiny_lm_dataset(n=4, seed=5), 4), run / "uma")
        code = main(["backfill", str(run), "--trackers", "down_test", "--no-figures", "--no-trajectory"])
    finally:
        _REGISTERED.pop("down_test", None)
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "sink down_test failed" in captured.out
