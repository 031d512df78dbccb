"""Shared fixtures: quiet, reproducible, offline."""

import gc
import os
import sys

import pytest
import torch

try:  # CI runs the property tests on a fixed set of examples, so a run is reproducible
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread is faster, and immune to an oversubscribed CPU.
    (Subprocesses the tests start, torchrun included, keep their own defaults.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """A W&B run a test leaves open (the Trainer's WandbCallback does not finish its run) keeps
    its console hooks and service in this worker, and breaks the next test's wandb: finish it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish()
    except Exception:  # its folder may be gone with the test's tmp_path
        pass
    try:
        wandb.teardown()
    except Exception:
        pass


@pytest.fixture(autouse=True)
def _no_mlflow_run_left_open():
    """A test that leaves an MLflow run active in this worker would hand it to the next test's
    Trainer (``MLflowCallback`` logs into an active run), in another test's store: end it.

    So would a global tracking URI: ``mlflow.set_tracking_uri`` (Lightning's ``MLFlowLogger``
    calls it) sets MLflow's process-wide URI and ``MLFLOW_TRACKING_URI`` in ``os.environ``, and
    the Trainer's ``MLflowCallback`` then ignores the next test's ``MLFLOW_TRACKING_URI`` and
    logs into the earlier store: both are put back as they were before the test.
    """
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and getattr(utils, "_tracking_uri", None) is not None:
        utils._tracking_uri = None
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
    for _ in range(8):  # nested runs
        try:
            if mlflow.active_run() is None:
                return
            mlflow.end_run()
        except Exception:  # its store is gone with the test's tmp_path: forget the run
            try:
                mlflow.tracking.fluent._active_run_stack.get().clear()
            except Exception:
                return


# The cyclic garbage collector: a full collection walks every object the process holds, and a
# test worker holds millions (torch, transformers, MLflow, W&B, every test module), so one costs
# 0.5 to 1 s here. The suite runs one after each metric that does not end "ok" (the package's
# release_memory), and Python runs others by itself as objects pile up: a quarter of the CPU time
# of tests/metrics and tests/engine. Each test's leftovers are collected after it and what
# survives is frozen (gc.freeze: kept out of later collections), so a collection inside a test
# walks only what that test made. Objects that reference counting frees are freed as before.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on its own SQLite store on 127.0.0.1, started once per test
    worker (10 to 20 s each start) and shared by the modules that ``SHARED`` hands out together
    under "mlflow server" (the reliability tests front it with a proxy or a gate; the watcher
    logs through it). Its store holds every such test's runs: a test finds its own by run id,
    or by the runs it added."""
    pytest.importorskip("mlflow")
    from tests.reliability.servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory) -> dict[str, object]:
    """One ``torchrun --nproc_per_node 2`` (gloo, CPU) of tests/scripts/two_rank_runs.py, read by
    the modules ``SHARED`` hands out together under "two-rank run": the bare FSDP2 loop's folder
    (``"fsdp"``: tests/distributed/test_fsdp.py), the DDP Trainer run's (``"ddp"``, its MLflow
    store ``"ddp_uri"``: tests/test_distributed.py) and the FSDP2 Accelerate loop's (``"attach"``,
    ``"attach_uri"``: tests/distributed/test_fsdp_attach.py). The ranks start once for the three
    (a rank's imports cost as much as any one of the runs)."""
    import subprocess

    from tests.mlflow_store import mlflow_store

    pytest.importorskip("torch.distributed.fsdp")
    pytest.importorskip("accelerate")
    pytest.importorskip("mlflow")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {name: tmp_path_factory.mktemp(name) for name in ("fsdp", "ddp", "attach")}
    uris = {f"{name}_uri": mlflow_store(out[name]) for name in ("ddp", "attach")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(repo, "tests", "scripts", "two_rank_runs.py"), "--fsdp-out", str(out["fsdp"]),
           "--ddp-out", str(out["ddp"]), "--ddp-tracking-uri", uris["ddp_uri"],
           "--attach-out", str(out["attach"]), "--attach-tracking-uri", uris["attach_uri"]]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=repo, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**out, **uris}


# ---------------------------------------------------------------------- order: longest modules first
#: Seconds of the test modules of 5 s or more in a full run on 2 cores with 3 workers (the sum of
#: their tests' setup, call and teardown, ``--durations=0``; refresh after a test grows or a
#: slow module is added). ``make test`` hands out whole modules (``--dist loadscope``: a
#: module's fixtures are built once; the modules of a ``SHARED`` unit together, their seconds
#: summed), longest first, to whichever worker is free: the workers finish within a few seconds
#: of each other. A module missing here counts as
#: 20 s when it holds a slow-marked test (early rather than last), else as a short one: list any
#: module of more than about 5 s without a slow mark, or it may come last.
MODULE_SECONDS = {
    "tests/triggers/test_minilm_budget.py": 75,
    "tests/triggers/test_watch.py": 67,
    "tests/distributed/test_fsdp.py": 49,
    "tests/reliability/test_held_attacks.py": 48,
    "tests/engine/test_budget_per_sample.py": 36,
    "tests/reliability/test_fuzz_run_folder.py": 34,
    "tests/triggers/test_backfill_ray.py": 29,
    "tests/reliability/test_run_identity.py": 28,
    "tests/engine/test_budget.py": 22,
    "tests/reliability/test_determinism.py": 19,
    "tests/reliability/test_budget_holds.py": 19,
    "tests/triggers/test_backfill_shard.py": 18,
    "tests/reliability/test_tracker_outage.py": 18,
    "tests/metrics/test_hessian_blocks.py": 17,
    "tests/triggers/test_accelerate.py": 17,
    "tests/triggers/test_backfill.py": 16,
    "tests/triggers/test_accelerate_heads.py": 14,
    "tests/core/test_dcp.py": 13,
    "tests/reliability/test_tracker_stall.py": 12,
    "tests/triggers/test_trainer.py": 12,
    "tests/metrics/test_hessian_density.py": 12,
    "tests/triggers/test_trainer_figures.py": 12,
    "tests/test_packaging.py": 11,
    "tests/integrations/test_wandb.py": 11,
    "tests/integrations/test_wandb_charts.py": 10,
    "tests/reliability/test_journal_concurrency.py": 9,
    "tests/reliability/test_tracker_down_at_start.py": 9,
    "tests/triggers/test_spike.py": 8,
    "tests/triggers/test_lightning.py": 8,
    "tests/integrations/test_curvature_tables.py": 8,
    "tests/metrics/test_hessian.py": 7,
    "tests/integrations/test_wandb_workspace.py": 7,
    "tests/reliability/test_step_identity.py": 7,
    "tests/reliability/test_hostile_content.py": 7,
    "tests/metrics/test_contract.py": 7,
    "tests/reliability/test_crash_safety.py": 6,
    "tests/linalg/test_lanczos.py": 6,
    "tests/metrics/test_attention.py": 6,
    "tests/triggers/test_async_measure.py": 6,
    "tests/reliability/test_link_attacks.py": 6,
    "tests/metrics/test_sharpness.py": 5,
    "tests/integrations/test_mlflow.py": 5,
    "tests/integrations/test_status_tags.py": 5,
    "tests/metrics/test_partial_results.py": 5,
    "tests/reliability/test_model_safety.py": 5,
    "tests/reliability/test_global_rng.py": 5,
    "tests/reliability/test_inputs.py": 5,
}
UNLISTED_SLOW_SECONDS = 20.0
#: Modules that share what a test process builds once, handed out together to one worker:
#: the real ``mlflow server`` (the ``mlflow_server`` fixture above), the 2-process DCP run
#: (tests/core/dcp_run.py) and the 2-rank torchrun (the ``two_rank_runs`` fixture above).
SHARED = {
    "tests/reliability/test_held_attacks.py": "mlflow server",
    "tests/reliability/test_tracker_down_at_start.py": "mlflow server",
    "tests/reliability/test_tracker_outage.py": "mlflow server",
    "tests/reliability/test_tracker_stall.py": "mlflow server",
    "tests/triggers/test_watch.py": "mlflow server",
    "tests/core/test_dcp.py": "dcp run",
    "tests/triggers/test_dcp_backfill.py": "dcp run",
    "tests/distributed/test_fsdp.py": "two-rank run",
    "tests/distributed/test_fsdp_attach.py": "two-rank run",
    "tests/test_distributed.py": "two-rank run",
}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    slow = {_module(item.nodeid) for item in items if item.get_closest_marker("slow")}
    seconds: dict[str, float] = {}
    for module in {_module(item.nodeid) for item in items}:
        unit = SHARED.get(module, module)
        guess = UNLISTED_SLOW_SECONDS if module in slow else 0.0
        seconds[unit] = seconds.get(unit, 0.0) + MODULE_SECONDS.get(module, guess)
    order = {id(item): i for i, item in enumerate(items)}
    first = {}
    for item in items:
        first.setdefault(SHARED.get(_module(item.nodeid), _module(item.nodeid)), order[id(item)])

    def key(item):
        unit = SHARED.get(_module(item.nodeid), _module(item.nodeid))
        return -seconds[unit], first[unit], order[id(item)]

    items.sort(key=key)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope``: a module is one unit of work, or with the modules sharing its resource (``SHARED``)."""
    if config.getoption("dist", None) != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED.get(_module(nodeid)) or super()._split_scope(nodeid)

    return Scheduler(config, log)
