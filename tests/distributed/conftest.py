"""The FSDP2 torchrun both FSDP test modules read (``SHARED`` in tests/conftest.py hands them out together)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fsdp_runs(tmp_path_factory) -> dict[str, Path]:
    """One ``torchrun --nproc_per_node 2`` of tests/scripts/fsdp_both.py (gloo, CPU): the bare
    training loop's folder (``"metrics"``, with ``fsdp_result.json``) and the Accelerate loop's
    (``"attach"``, with ``fsdp_attach.json`` and its MLflow store ``"uri"``). Each rank starts
    once for both (the imports of a rank cost as much as either run)."""
    pytest.importorskip("torch.distributed.fsdp")
    pytest.importorskip("accelerate")
    pytest.importorskip("mlflow")
    metrics, attach = tmp_path_factory.mktemp("fsdp"), tmp_path_factory.mktemp("fsdp_attach")
    uri = f"sqlite:///{attach / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/scripts/fsdp_both.py"), "--metrics-out", str(metrics), "--attach-out", str(attach),
           "--tracking-uri", uri]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"metrics": metrics, "attach": attach, "uri": uri}
