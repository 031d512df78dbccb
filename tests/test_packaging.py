"""The distribution installs `integrations/` as `uma_callbacks.integrations`; optional extras stay optional."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_imports_integrations(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("uma_callbacks-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "uma_callbacks/integrations/mlflow.py" in names
    assert not any(n.startswith("integrations/") for n in names)  # no top-level `integrations` module
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import uma_callbacks, uma_callbacks.integrations.mlflow as m;"
        "print(uma_callbacks.__file__); print(m.MLflowSink.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "mlflow"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "uma = uma_callbacks.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_import_without_trackers_matplotlib_or_the_optional_engines():
    """The package, its command and its triggers import with no tracker, no matplotlib and no
    optional engine (Ray, Lightning, TensorBoard, wandb-workspaces); a sink asked for says
    which extra to install."""
    code = (
        "import sys\n"
        "for m in ('wandb', 'mlflow', 'matplotlib', 'ray', 'lightning', 'tensorboard', 'wandb_workspaces'):\n"
        "    sys.modules[m] = None\n"
        "import uma_callbacks\n"
        "from uma_callbacks import UMACallback, MetricSuite\n"
        "import uma_callbacks.cli, uma_callbacks.triggers.backfill, uma_callbacks.triggers.watch\n"
        "from uma_callbacks.metrics import METRICS\n"
        "assert 'wandb' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "from uma_callbacks.integrations import make_sink\n"
        "try:\n"
        "    make_sink('mlflow')\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "pip install 'uma-callbacks[mlflow]'" in out.stdout
