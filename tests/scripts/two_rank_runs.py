"""Three 2-rank runs in one ``torchrun``: each rank imports torch, transformers and the package once.

Run by the ``two_rank_runs`` fixture (``tests/conftest.py``)::

    torchrun --standalone --nproc_per_node 2 tests/scripts/two_rank_runs.py \
        --fsdp-out A --ddp-out B --ddp-tracking-uri sqlite:///B/mlflow.db \
        --attach-out C --attach-tracking-uri sqlite:///C/mlflow.db

On one gloo process group, in turn:

1. :func:`tests.scripts.fsdp_metrics.run`: a bare FSDP2 training loop with a
   :class:`~uma_callbacks.session.Session` and no tracker (``A/fsdp_result.json``);
2. :func:`tests.scripts.ddp_trainer.run`: a DDP ``Trainer`` run with the callback, logging
   to the MLflow store at ``--ddp-tracking-uri`` (``B/ddp_result.json``);
3. :func:`tests.scripts.fsdp_attach.run`: an FSDP2 ``Accelerator`` loop with ``attach()``,
   logging to the store at ``--attach-tracking-uri`` (``C/fsdp_attach.json``).

Each part has its own folders and store and seeds its own model and data, so its results
are those of its script run alone (each script still runs alone under torchrun).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scripts import ddp_trainer, fsdp_attach, fsdp_metrics  # noqa: E402


def main() -> None:
    """The three runs on one process group; each MLflow store is named only for its part."""
    parser = argparse.ArgumentParser()
    for name in ("--fsdp-out", "--ddp-out", "--ddp-tracking-uri", "--attach-out", "--attach-tracking-uri"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the bare loop logs nowhere
    torch.distributed.init_process_group("gloo")
    try:
        fsdp_metrics.run(Path(args.fsdp_out))
        torch.distributed.barrier()
        os.environ["MLFLOW_TRACKING_URI"] = args.ddp_tracking_uri
        ddp_trainer.run(Path(args.ddp_out))  # the Trainer joins the process group
        torch.distributed.barrier()
        os.environ["MLFLOW_TRACKING_URI"] = args.attach_tracking_uri
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
