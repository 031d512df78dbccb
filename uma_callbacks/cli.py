"""The ``uma`` command: ``uma backfill``, ``uma watch``, ``uma report``, ``uma sync``.

Exit codes: 0 all done; 1 some checkpoint or metric failed (the others were processed;
a summary lists the reasons); 2 bad input (missing folder, no checkpoints, no probe,
bad option, a file that cannot be read). Content read from disk that is damaged or odd
(a torn or hostile journal line, a result file of another shape) is skipped, counted and
reported by each command, never a crash.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

_BACKFILL_EPILOG = """examples:
  # measure Fisher and a landscape slice at every checkpoint-*/ of a Trainer run,
  # on the probe the live callback saved, into the run's MLflow run
  uma backfill runs/demo --metrics fisher,landscape \\
      --mlflow-run 3f2c... --tracking-uri sqlite:///runs/demo/mlflow.db

  # same, joining the MLflow run the journal already delivered to
  uma backfill runs/demo --metrics fisher --trackers mlflow

  # a run without a saved probe: rebuild it from texts (tokenizer from the checkpoints)
  uma backfill runs/demo --metrics gradient_flow --texts probe.txt --probe-size 32 --seed 42

  # into an existing W&B run
  uma backfill runs/demo --metrics fisher --wandb-run abc123

  # a Slurm job array of 4 (or a Kubernetes indexed job: $JOB_COMPLETION_INDEX/4), then one sync
  uma backfill runs/demo --metrics fisher --shard $SLURM_ARRAY_TASK_ID/4
  uma sync runs/demo --trackers mlflow

  # metric options: a cheaper Hessian, pruning at two sparsities, task vectors from a base
  uma backfill runs/demo --metric hessian:top_k=2,hutchinson_samples=5 \
      --metric "pruning:sparsities=[0.5,0.9]" --metric task_vectors:base=runs/base-model

The probe: --probe-from-journal (default when no --texts) reads <journal>/probe.safetensors,
which the live callback saves at train begin; its fingerprint must match the journal's
records (--new-probe overrides). Rerunning is safe: finished (checkpoint, metric) pairs
come from the journal and no tracker point is logged twice.
"""

_REPORT_EPILOG = """examples:
  uma report runs/demo                 # writes runs/demo/uma/report.png and report.html
  uma report runs/demo --out /tmp/rep  # elsewhere
"""

_SYNC_EPILOG = """examples:
  # replay to every tracker run the journal delivered to what it has not received yet
  uma sync runs/demo
  # the MLflow run named
  uma sync runs/demo --mlflow-run 3f2c... --tracking-uri sqlite:///runs/demo/mlflow.db
  uma sync runs/demo --trackers mlflow   # the run the journal last delivered to
  uma sync runs/demo --wandb-run abc123
"""

_DASHBOARD_EPILOG = """examples:
  # a workspace with a section per metric family the run logged, on the uma/step axis
  uma dashboard wandb my-team/my-project --run abc123
  # every registered metric (plots select their keys by regex), written as JSON only
  uma dashboard wandb my-team/my-project --dry-run workspace.json

Needs the optional extra: pip install 'uma-callbacks[workspaces]' (exit 2 without it).
"""

_WATCH_EPILOG = """examples:
  # beside a training started with UMACallback(..., measure="async"): measure each
  # checkpoint it saves, with the training's metrics, into its MLflow / W&B run
  uma watch runs/demo

  # on a spare GPU, the whole suite, until the training has finished
  uma watch runs/demo --device cuda:1 --metrics fisher,landscape,interpolation --until-done

  # a cheaper Hessian than the training asked for; check every 30 s
  uma watch runs/demo --metric hessian:top_k=2,hutchinson_samples=5 --poll 30

  # a checkpoint folder that never completes (a crashed save) is an error after 10 minutes
  uma watch runs/demo --until-done --stale-after 600

The training announces each complete checkpoint in <journal>/watch.jsonl and keeps a
hard-linked copy of its weights until it is measured (save_total_limit loses nothing).
Stopped (even kill -9) and started again, it resumes: nothing is measured twice.
W&B: the watcher joins the training's run in shared mode (a second writer labelled
uma-watch); with WANDB_MODE=offline it writes its own run file of the same run id under
<journal>/wandb/ (upload it with `wandb sync --id RUN` after the training's).
Exit codes: 0 all measured, 1 some checkpoint or metric failed, 2 bad input (no training
announced in RUN_DIR: start it with measure="async").
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``uma`` (subcommands backfill, report, sync)."""
    parser = argparse.ArgumentParser(
        prog="uma",
        description="Training-geometry diagnostics over saved checkpoints and journals.",
        epilog="run `uma <command> --help` for each command's options and examples",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    from uma_callbacks.metric_specs import describe_metrics

    bf = sub.add_parser("backfill", help="measure saved checkpoints and log at their steps",
                        epilog=_BACKFILL_EPILOG + "\nmetrics and their options (defaults):\n" + describe_metrics(),
                        formatter_class=fmt, description="Measure every checkpoint of RUN_DIR at its own global step.")
    bf.add_argument("run_dir", help="run folder with checkpoint-*/ (or Accelerate state) folders")
    bf.add_argument("--metrics", default="", help="comma-separated metric names with default options (default gradient_flow)")
    bf.add_argument("--metric", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="one metric with options, e.g. hessian:top_k=2,hutchinson_samples=5 (repeatable; see the list below)")
    bf.add_argument("--config", help="JSON file: {\"metrics\": {\"hessian\": {\"top_k\": 2}, ...}}")
    bf.add_argument("--timeout", type=float, help="time limit per metric, in seconds")
    _tracker_args(bf)
    _executor_args(bf)
    probe = bf.add_mutually_exclusive_group()
    probe.add_argument("--probe-from-journal", action="store_true", help="use the probe saved in the journal (default)")
    probe.add_argument("--texts", help="text file (one sample per line) to build the probe from")
    bf.add_argument("--tokenizer", help="tokenizer folder for --texts (default: the checkpoints')")
    bf.add_argument("--probe-size", type=int, default=64, help="probe samples drawn from --texts (default 64)")
    bf.add_argument("--probe-batch-size", type=int, default=8, help="samples per probe batch (default 8)")
    bf.add_argument("--max-length", type=int, default=128, help="token truncation for --texts (default 128)")
    bf.add_argument("--seed", type=int, default=42, help="draws the probe samples and seeds the metrics' estimators unless a --metric sets seed= (default 42)")
    bf.add_argument("--new-probe", action="store_true", help="accept a probe the journal's records do not carry")
    bf.add_argument("--output-dir", help="journal folder (default RUN_DIR/uma)")
    bf.add_argument("--no-trajectory", action="store_true", help="skip the checkpoint-trajectory record")
    bf.add_argument("--no-cache", action="store_true", help="recompute even what the journal holds")
    bf.add_argument("--no-figures", action="store_true", help="do not draw PNG figures")
    bf.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    bf.add_argument("--shard", metavar="K/N",
                    help="measure block K of N (0 <= K < N) of the checkpoints, journal only; "
                         "`uma sync` delivers once every shard has finished (Slurm arrays, indexed jobs)")
    bf.set_defaults(func=_backfill)

    rp = sub.add_parser("report", help="multi-panel PNG + HTML page of the journal", epilog=_REPORT_EPILOG,
                        formatter_class=fmt, description="Draw every metric's main scalars across steps.")
    rp.add_argument("run_dir", help="run folder (or its uma/ journal folder)")
    rp.add_argument("--out", help="output folder (default: the journal folder)")
    rp.set_defaults(func=_report)

    sy = sub.add_parser("sync", help="replay journalled records a tracker missed", epilog=_SYNC_EPILOG,
                        formatter_class=fmt, description="Deliver every journalled record a tracker has not received.")
    sy.add_argument("run_dir", help="run folder (or its uma/ journal folder)")
    _tracker_args(sy)
    sy.set_defaults(func=_sync)

    wt = sub.add_parser("watch", help="measure a training's checkpoints beside it, as they are saved",
                        epilog=_WATCH_EPILOG + "\nmetrics and their options (defaults):\n" + describe_metrics(),
                        formatter_class=fmt,
                        description="Follow a training run with measure=\"async\" and measure each checkpoint it announces.")
    wt.add_argument("run_dir", help="the training's output folder (checkpoint-*/ and uma/)")
    wt.add_argument("--metrics", default="", help="comma-separated metric names (default: the training's metrics)")
    wt.add_argument("--metric", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="one metric with options, e.g. hessian:top_k=2 (repeatable; replaces the training's metrics)")
    wt.add_argument("--config", help="JSON file: {\"metrics\": {\"hessian\": {\"top_k\": 2}, ...}}")
    wt.add_argument("--seed", type=int, default=42, help="seeds the metrics given here unless a --metric sets seed= (default 42)")
    wt.add_argument("--timeout", type=float, help="time limit per metric, in seconds")
    wt.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    wt.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="seconds between two looks at the run (default 5)")
    wt.add_argument("--until-done", action="store_true", help="exit once the training has finished and every checkpoint is measured")
    wt.add_argument("--stale-after", type=float, metavar="SECONDS",
                    help="a checkpoint-* folder this old with no complete-checkpoint announcement becomes an error record")
    wt.add_argument("--output-dir", help="journal folder (default RUN_DIR/uma)")
    wt.add_argument("--no-figures", action="store_true", help="do not draw PNG figures")
    _tracker_args(wt)
    wt.set_defaults(func=_watch)

    db = sub.add_parser("dashboard", help="a saved W&B workspace over the uma/* keys", epilog=_DASHBOARD_EPILOG,
                        formatter_class=fmt, description="Build a W&B workspace: one section per metric family, on uma/step.")
    db_sub = db.add_subparsers(dest="tracker", required=True)
    dbw = db_sub.add_parser("wandb", help="save a W&B workspace (wandb-workspaces)", epilog=_DASHBOARD_EPILOG, formatter_class=fmt)
    dbw.add_argument("path", metavar="ENTITY/PROJECT", help="the W&B entity and project")
    dbw.add_argument("--run", metavar="ID", help="show only what this run logged (read online)")
    dbw.add_argument("--name", default="uma diagnostics", help="the workspace's name (default: uma diagnostics)")
    dbw.add_argument("--dry-run", metavar="FILE", help="write the workspace as JSON to FILE, save nothing (no network)")
    dbw.set_defaults(func=_dashboard)
    return parser


def _tracker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trackers", default="", help="comma-separated: mlflow, wandb")
    parser.add_argument("--mlflow-run", help="existing MLflow run id to log into")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (e.g. sqlite:///runs/demo/mlflow.db)")
    parser.add_argument("--wandb-run", help="existing W&B run id to log into (resumed)")


def _executor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", default="local", choices=("local", "ray"),
                        help="local (default): this process; ray: checkpoints (and checkpoint x metric for the "
                             "expensive ones) as Ray tasks, journalled and delivered here (needs uma-callbacks[ray])")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray)")
    parser.add_argument("--cpus-per-task", type=_at_least_zero, help="CPUs Ray reserves per task (default 1)")
    parser.add_argument("--gpus-per-task", type=_at_least_zero, help="GPUs Ray reserves per task (default 0; 0.5 shares a GPU)")


def _at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0; got {text!r}")
    return value


def _backfill_runner(args: argparse.Namespace, backfill: Any) -> Any:
    """``backfill``, or ``ray_backfill`` with the task options (``--executor ray``).

    Raises:
        ValueError: Ray options without ``--executor ray``, or Ray is not installed (naming the extra).
    """
    ray_options = {"ray_address": args.ray_address, "cpus_per_task": args.cpus_per_task, "gpus_per_task": args.gpus_per_task}
    if args.executor != "ray":
        given = [f"--{k.replace('_', '-')}" for k, v in ray_options.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need --executor ray (--executor is {args.executor!r}; allowed: local, ray)")
        return backfill
    from uma_callbacks.triggers.ray_backfill import ray_backfill, ray_missing

    why = ray_missing()
    if why is not None:
        raise ValueError(why)
    chosen = {k: v for k, v in ray_options.items() if v is not None}

    def run(*positional: Any, shard: Any = None, **kwargs: Any) -> Any:
        if shard is not None:
            raise ValueError("--shard splits a backfill without Ray; with --executor ray, Ray spreads the tasks")
        return ray_backfill(*positional, **kwargs, **chosen)

    return run


def _split(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _backfill(args: argparse.Namespace) -> int:
    from uma_callbacks.triggers.backfill import backfill, parse_shard

    shard = parse_shard(args.shard) if args.shard is not None else None  # ValueError: exit 2
    texts = None
    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise FileNotFoundError(f"--texts file {path} does not exist")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from uma_callbacks.metric_specs import metrics_from_file, parse_metric_spec

    metrics: list[Any] = list(_split(args.metrics)) + [parse_metric_spec(spec, seed=args.seed) for spec in args.metric]
    if args.config:
        metrics += metrics_from_file(args.config, seed=args.seed)
    extra = {"timeout_seconds": args.timeout} if args.timeout is not None else {}
    summary = _backfill_runner(args, backfill)(  # ValueError: exit 2
        args.run_dir,
        metrics=metrics or ["gradient_flow"],
        **extra,
        texts=texts,
        tokenizer=args.tokenizer,
        probe_size=args.probe_size,
        probe_batch_size=args.probe_batch_size,
        max_length=args.max_length,
        seed=args.seed,
        trackers=_split(args.trackers),
        mlflow_run_id=args.mlflow_run,
        tracking_uri=args.tracking_uri,
        wandb_run_id=args.wandb_run,
        output_dir=args.output_dir,
        trajectory=not args.no_trajectory,
        use_cache=not args.no_cache,
        check_probe=not args.new_probe,
        draw_figures=not args.no_figures,
        device=args.device,
        shard=shard,
    )
    print(summary.describe())
    return 0 if summary.ok else 1


def _report(args: argparse.Namespace) -> int:
    from uma_callbacks.report import find_journal, write_report

    journal = find_journal(args.run_dir)
    png, page = write_report(args.run_dir, args.out, journal=journal)
    print(f"report: {png}\nreport: {page}")
    _journal_health(journal)
    return 0


def _journal_health(journal: Any) -> None:
    """Say what the journal skipped or refused (torn or foreign lines, files outside it)."""
    if journal.bad_lines:
        print(f"journal: {journal.bad_lines} line(s) skipped ({journal.foreign_lines} of a foreign shape)")
    if journal.refused_files:
        print(f"journal: {len(journal.refused_files)} file path(s) refused (outside the journal folder)")
    if getattr(journal, "unreadable_files", None):
        print(f"journal: {len(journal.unreadable_files)} result file(s) unreadable (damaged or of another shape), left out")


def _sync(args: argparse.Namespace) -> int:
    from uma_callbacks.engine.delivery import Delivery
    from uma_callbacks.report import find_journal
    from uma_callbacks.triggers.run_sinks import sinks_for_run

    journal = find_journal(args.run_dir)
    run_dir = journal.root.parent if journal.root.name == "uma" else journal.root
    sinks = sinks_for_run(_split(args.trackers), journal, run_dir, args.mlflow_run, args.tracking_uri, args.wandb_run)
    if not sinks:
        raise ValueError(
            "sync: no tracker given and the journal has delivered to none; pass --trackers mlflow "
            "(with --tracking-uri URI, or --mlflow-run ID), --wandb-run ID, or --trackers wandb"
        )
    failed: list[str] = []
    for sink in sinks:
        delivery = Delivery(journal, [sink], [sink])
        sent = delivery.send_pending()
        failing = delivery.failing
        delivery.finish()
        failed += sorted(failing)
        state = "FAILED, records stay in the journal" if failing else "ok"
        print(f"sync: {sent} record(s) delivered to {sink.name} run {sink.run_id() or '?'} ({state})")
    _journal_health(journal)
    return 1 if failed else 0


def _watch(args: argparse.Namespace) -> int:
    from uma_callbacks.metric_specs import metrics_from_file, parse_metric_spec
    from uma_callbacks.triggers.watch import watch

    metrics: list[Any] = list(_split(args.metrics)) + [parse_metric_spec(spec, seed=args.seed) for spec in args.metric]
    if args.config:
        metrics += metrics_from_file(args.config, seed=args.seed)
    extra: dict[str, Any] = {"timeout_seconds": args.timeout} if args.timeout is not None else {}
    if args.trackers:
        extra["trackers"] = _split(args.trackers)
    if args.no_figures:
        extra["draw_figures"] = False
    logging.getLogger("uma_callbacks.triggers.watch").setLevel(logging.INFO)

    def progress(step: int, records: list[Any]) -> None:
        states = ", ".join(f"{r.metric} {r.status}" for r in records) or "already measured"
        print(f"watch: step {step}: {states}", flush=True)

    summary = watch(
        args.run_dir,
        metrics or None,
        device=args.device,
        poll=args.poll,
        until_done=args.until_done,
        stale_after=args.stale_after,
        output_dir=args.output_dir,
        mlflow_run_id=args.mlflow_run,
        tracking_uri=args.tracking_uri,
        wandb_run_id=args.wandb_run,
        on_checkpoint=progress,
        seed=args.seed,
        **extra,
    )
    print(summary.describe())
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def _dashboard(args: argparse.Namespace) -> int:
    from uma_callbacks.integrations import wandb_workspace as wsp

    entity, project = wsp.split_path(args.path)
    try:
        keys = wsp.keys_from_api(args.path, args.run) if args.run else None
        workspace = wsp.build_workspace(entity, project, keys, name=args.name, run_id=args.run)
    except ModuleNotFoundError as err:  # the optional extra (wandb-workspaces, or wandb for --run)
        print(f"uma dashboard: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        Path(args.dry_run).write_text(wsp.workspace_json(workspace), encoding="utf-8")
        print(f"dashboard: {args.dry_run} (nothing saved)\n{wsp.describe(workspace)}")
        return 0
    try:
        workspace.save()
    except Exception as err:  # noqa: BLE001 (W&B refused or unreachable: said, exit 1)
        print(f"uma dashboard: the workspace was not saved: {type(err).__name__}: {str(err)[:500]}", file=sys.stderr)
        return 1
    print(f"dashboard: saved {workspace.url}\n{wsp.describe(workspace)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``uma`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for noisy in ("mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as err:  # FileNotFoundError, PermissionError, UnreadableJSON included
        print(f"uma {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run() -> Any:  # pragma: no cover - python -m uma_callbacks.cli
    raise SystemExit(main())


if __name__ == "__main__":  # pragma: no cover
    _run()
