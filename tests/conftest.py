"""Shared fixtures: quiet, reproducible, offline."""

import gc
import os

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
