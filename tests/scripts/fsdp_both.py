"""The two FSDP2 scripts in one ``torchrun``: each rank imports torch, transformers and the package once.

Run by the ``fsdp_runs`` fixture (``tests/distributed/conftest.py``)::

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_both.py \
        --metrics-out DIR_A --attach-out DIR_B --tracking-uri sqlite:///DIR_B/mlflow.db

On one gloo process group: first :func:`tests.scripts.fsdp_metrics.run` (a bare training
loop with a :class:`~uma_callbacks.session.Session`, no tracker), writing
``DIR_A/fsdp_result.json``; then :func:`tests.scripts.fsdp_attach.run` (an ``Accelerator``
on the same group, ``attach()`` logging to the MLflow store at ``--tracking-uri``), writing
``DIR_B/fsdp_attach.json``. Each part keeps its own folders and seeds its own model, so its
results are those of its script run alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scripts import fsdp_attach, fsdp_metrics  # noqa: E402


def main() -> None:
    """Both runs on one process group; the MLflow store is named only for the second."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics-out", required=True)
    parser.add_argument("--attach-out", required=True)
    parser.add_argument("--tracking-uri", required=True)
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the bare loop logs nowhere
    torch.distributed.init_process_group("gloo")
    try:
        fsdp_metrics.run(Path(args.metrics_out))
        torch.distributed.barrier()
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True, project_dir=args.attach_out)  # joins the process group
        try:
            fsdp_attach.run(accelerator, Path(args.attach_out))
        finally:
            accelerator.end_training()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
