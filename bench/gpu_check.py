"""GPU check: Fisher (diagonal + top-5) and an 11x11 landscape on a 0.5B Qwen2, under 20 GiB.

A Qwen2 built from config at Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV
heads, intermediate 4864, vocab 151936; about 0.49B parameters, random weights) in bf16,
a probe of 64 random sequences of 512 tokens, and ``MemoryBudget(max_gb=20)``: each metric
is planned by ``compute_within_budget`` (memory mode, chunk) and run; the script prints
the plan, the measured peak (``torch.cuda.max_memory_allocated`` above the level at the
metric's start) and the time, then ``name=value`` lines.

``--tiny`` runs the same script on CPU with a 2-layer toy shape, to check that it works.

``--fsdp-trainer`` (under ``torchrun``, one process per GPU, at most 2): the Trainer with
``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}``
and ``UMACallback(["gradient_flow", "fisher"])`` on a small Qwen2 for 4 steps, saving at 2 and 4.
Inside the callback's ``on_save`` it checks that every parameter is a ``DTensor`` (FSDP2 really
sharded the model; on CPU Accelerate falls back to DDP and this is 0), that the metrics came
out ``ok``, then (rank 0, process group closed) backfills the sharded checkpoints
(``checkpoint-N/pytorch_model_fsdp_0/``) and compares with the live values.

Run: ``bash bench/gpu_check.sh`` (GPU) or ``python bench/gpu_check.py --tiny`` (CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

QWEN05 = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shape on CPU (a functional check)")
    parser.add_argument("--max-memory-gb", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--fisher-matvecs", type=int, default=8, help="Lanczos products for the Fisher top-5")
    parser.add_argument("--fsdp-trainer", action="store_true", help="the Trainer + FSDP2 check (run under torchrun)")
    parser.add_argument("--cpu", action="store_true", help="with --fsdp-trainer: on CPU (a functional check; DDP, not FSDP)")
    parser.add_argument("--backfill-check", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fsdp_trainer:
        fsdp_trainer_check(args.cpu)
        return
    if args.backfill_check:
        backfill_check(args.backfill_check)
        return

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from uma_callbacks.engine.budget import MemoryBudget, compute_within_budget, param_bytes
    from uma_callbacks.metrics import FisherInformation, LossLandscape

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape, samples, length = (TINY, 8, 32) if args.tiny else (QWEN05, args.samples, args.length)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    started = time.perf_counter()
    model = Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype=dtype)).to(device=device, dtype=dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (samples, length), generator=gen)
    probe = [{"input_ids": c.to(device), "attention_mask": torch.ones_like(c).to(device), "labels": c.to(device)}
             for c in ids.split(8 if not args.tiny else 4)]
    print(f"device={device} params={n / 1e6:.1f}M ({param_bytes(model) / 2**30:.2f} GiB bf16) probe={samples}x{length} "
          f"build={time.perf_counter() - started:.1f}s", flush=True)
    budget = MemoryBudget(max_gb=args.max_memory_gb, device=device)
    metrics = [
        FisherInformation(top_k=5, keep_diagonal=True, max_matvecs=args.fisher_matvecs, lanczos_tol=1e-3),
        LossLandscape(n_points=11, span=0.5),
    ]
    summary = {}
    for metric in metrics:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            result = compute_within_budget(metric, model, probe, None, budget)
        except Exception as err:  # a bench reports, it does not stop: print and go on
            print(f"{metric.name}: FAILED {type(err).__name__}: {err}", flush=True)
            summary[f"{metric.name}_failed"] = 1
            continue
        seconds = time.perf_counter() - t0
        meta = result.meta
        print(f"{metric.name}: mode={meta.get('memory_mode')} chunk={meta['chunk_size']} retries={meta['retries']} "
              f"planned_fixed={meta.get('planned_fixed_bytes', 0) / 2**30:.2f}GiB "
              f"planned_per_sample={meta.get('planned_per_sample_bytes', 0) / 2**20:.0f}MiB "
              f"peak={meta['peak_bytes'] / 2**30:.2f}GiB seconds={seconds:.1f}", flush=True)
        if metric.name == "fisher":
            print(f"  trace={result.scalars['trace']:.4g} top_eigenvalues={result.arrays['top_eigenvalues'].tolist()} "
                  f"matvecs={meta.get('matvecs')} converged={meta.get('lanczos_converged')}", flush=True)
        else:
            print(f"  center_loss={result.scalars['center_loss']:.4f} roughness={result.scalars['roughness']:.4f}", flush=True)
        summary[f"{metric.name}_peak_gb"] = meta["peak_bytes"] / 2**30
        summary[f"{metric.name}_seconds"] = seconds
        summary[f"{metric.name}_chunk"] = meta["chunk_size"]
        summary[f"{metric.name}_under_budget"] = int(meta["peak_bytes"] <= budget.max_bytes)
    if device.type == "cuda":
        summary["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    summary["total_seconds"] = time.perf_counter() - started
    for key, value in summary.items():
        print(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")


def fsdp_trainer_check(cpu: bool) -> None:
    """Trainer(fsdp="full_shard", FSDP2, sharded checkpoints) + UMACallback; see the module docstring."""
    import json
    import os
    import subprocess

    import datasets
    from torch.distributed.tensor import DTensor
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

    from uma_callbacks import UMACallback

    class CheckedCallback(UMACallback):
        """UMACallback that first records whether the model it gets holds DTensor parameters."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.dtensor: list[bool] = []

        def on_save(self, args, state, control, model=None, **kwargs):
            params = list(model.parameters()) if model is not None else []
            self.dtensor.append(bool(params) and all(isinstance(p, DTensor) for p in params))
            return super().on_save(args, state, control, model=model, **kwargs)

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))  # one fresh folder per torchrun, shared by its ranks
    out = os.path.join(os.environ.get("UMA_GPU_CHECK_DIR", "/tmp"), f"uma-gpu-fsdp-trainer-{run_id}")
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (64, 32), generator=gen).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 64, "labels": ids})
    args = TrainingArguments(
        output_dir=out, max_steps=4, save_steps=2, save_strategy="steps", per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], logging_steps=1, use_cpu=cpu,
        fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
                                        "state_dict_type": "SHARDED_STATE_DICT"},
    )
    callback = CheckedCallback(metrics=["gradient_flow", "fisher"], probe=data.select(range(8)), probe_size=8, trackers=[])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    live = {f"{r.step}/{r.metric}": r for r in callback.records}
    summary = {
        "world_size": trainer.args.world_size,
        "fsdp_params_are_dtensor": int(bool(callback.dtensor) and all(callback.dtensor)),
        "fsdp_metrics_ok": int(len(live) == 4 and all(r.status == "ok" for r in live.values())),
    }
    if trainer.args.process_index == 0:
        for key, r in sorted(live.items()):
            print(f"{key}: {r.status} " + (json.dumps(r.error)[:300] if r.error else
                  f"total_norm={r.scalars.get('total_norm')} trace={r.scalars.get('trace')}"), flush=True)
        for key, value in summary.items():
            print(f"{key}={value}", flush=True)
        # the backfill of the sharded checkpoints runs in a child process (one process, no process group);
        # the Trainer writes no config.json under SHARDED_STATE_DICT, so the check puts one in each
        for step in (2, 4):
            model.config.to_json_file(os.path.join(out, f"checkpoint-{step}", "config.json"))
        with open(os.path.join(out, "live.json"), "w") as fh:
            json.dump({k: r.scalars for k, r in live.items() if r.status == "ok"}, fh)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                                 "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
        subprocess.run([sys.executable, __file__, "--backfill-check", out], env=env, timeout=240, check=False)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 1 waits for rank 0's backfill; then both tear down together
        torch.distributed.destroy_process_group()


def backfill_check(out: str) -> None:
    """Backfill the sharded checkpoints of :func:`fsdp_trainer_check` and compare with its live values."""
    import json
    import math
    import os

    from uma_callbacks.triggers.backfill import backfill

    with open(os.path.join(out, "live.json")) as fh:
        live = json.load(fh)
    summary: dict[str, float | int] = {"dcp_backfill_ok": 0}
    try:
        done = backfill(out, metrics=["gradient_flow", "fisher"], output_dir=os.path.join(out, "uma-backfill"),
                        use_cache=False, trajectory=False, progress=False, draw_figures=False, trackers=[])
        print(done.describe(), flush=True)
        diffs = [abs(r.scalars[k] - ref[k]) / max(abs(ref[k]), 1e-12)
                 for r in done.records if (ref := live.get(f"{r.step}/{r.metric}")) and r.status == "ok"
                 for k in r.scalars if k in ref and math.isfinite(r.scalars[k]) and math.isfinite(ref[k])]
        summary["dcp_backfill_shards"] = done.per_checkpoint.get(2, {}).get("shards", 0)
        summary["dcp_backfill_ok"] = int(done.ok and len(done.records) == 4 and len(diffs) > 0)
        summary["dcp_backfill_max_rel_diff"] = max(diffs) if diffs else float("nan")
    except Exception as err:  # a check reports, it does not stop
        print(f"dcp backfill: FAILED {type(err).__name__}: {err}", flush=True)
    for key, value in summary.items():
        print(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}", flush=True)


if __name__ == "__main__":
    main()
