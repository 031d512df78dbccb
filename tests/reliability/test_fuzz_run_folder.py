"""Issue 29, section 2, the class fix: a standing fuzz test of everything read from a run folder.

One real run folder is built once: a tiny Trainer run with the callback (journal, result
JSON / npz / safetensors files, figures, the saved probe, ``checkpoint-<N>/`` folders with
``trainer_state.json``, ``config.json`` and ``model.safetensors``), one sharded (DCP)
checkpoint, a delivery log, and a real MLflow SQLite store. Each example copies it, mutates
ONE file (truncate, flip a byte, nest deeply, retype a field of a checksummed record or a
JSON file, huge numbers, a symlink or a hard link to a file outside), then runs:

- a save: a record appended to the journal and delivered to the MLflow store, as the
  callback does at each save;
- ``uma sync``, ``uma report`` and ``uma backfill`` (``main(argv)`` in-process);

and asserts that nothing raises, that each command exits 0 or with one of its documented
codes, and that every record whose journal line was not mutated is in the MLflow run.

Seeded (``derandomize=True``) with a bounded number of examples: the same examples on every
run. The seeds it grew from are pinned in ``test_hostile_content.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

from tests.mlflow_store import mlflow_store

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("mlflow")
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from uma_callbacks.cli import main
from uma_callbacks.core.records import Record
from uma_callbacks.engine.journal import DELIVERIES_FILE, JOURNAL_FILE, Journal, _checked_line

#: Generated examples per run, besides the explicit ones: bounded so the whole test, building
#: the folder included, stays under 60 s.
EXAMPLES = int(os.environ.get("UMA_FUZZ_EXAMPLES", "7"))  # raise it locally for a longer hunt
#: The kinds of file a run folder holds (each example mutates one file of one kind).
CLASSES = ("journal", "result-json", "result-arrays", "figure", "probe", "checkpoint-json", "weights", "dcp")
#: What each command may exit with (the cli's docstring): 0 done, 1 some part failed, 2 bad input.
EXIT_CODES = {"sync": {0, 1}, "report": {0, 2}, "backfill": {0, 1, 2}}
MUTATIONS = ("truncate", "flip", "deep", "retype", "huge", "symlink", "hardlink")
#: Odd values a field is retyped to (each seen to break a reader once).
ODD = ["abc", 10**30, -(10**30), 1e308, -1e308, None, True, [], [1, [2]], {}, {"a": "b"}, "", -1, 2**63]
DEEP = "[" * 200_000


def _files_by_class(run: Path) -> dict[str, list[str]]:
    """The run folder's files, grouped so each example picks a class first (all get tried)."""
    classes: dict[str, list[str]] = {}
    for path in sorted(p for p in run.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(run).as_posix()
        if rel.endswith((JOURNAL_FILE, DELIVERIES_FILE)):
            kind = "journal"
        elif "/step-" in f"/{rel}" and rel.endswith(".json"):
            kind = "result-json"
        elif rel.endswith((".npz", ".safetensors")) and "/step-" in f"/{rel}":
            kind = "result-arrays"
        elif rel.startswith("uma/probe"):
            kind = "probe"
        elif rel.endswith(".json"):
            kind = "checkpoint-json"
        elif "pytorch_model_fsdp_0" in rel:
            kind = "dcp"
        elif rel.endswith(".png"):
            kind = "figure"
        elif rel.endswith("model.safetensors"):
            kind = "weights"
        else:
            continue  # report outputs, claims, locks
        classes.setdefault(kind, []).append(rel)
    return classes


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """``(base folder, MLflow run id)``: ``base/run`` is the run folder, ``base/mlflow.db`` the store."""
    import torch
    import torch.distributed.checkpoint as dcp
    from mlflow.tracking import MlflowClient

    from tests.trainer_cases import run_trainer
    from uma_callbacks import UMACallback

    base = tmp_path_factory.mktemp("fuzz-base")
    run = base / "run"
    cb = UMACallback(metrics=["gradient_flow", "fisher"], probe_size=4, trackers=[])
    trainer, _ = run_trainer(run, callbacks=[cb], max_steps=4, save_steps=2)
    # a sharded (DCP) checkpoint at step 6, as FSDP's SHARDED_STATE_DICT writes it
    sharded = run / "checkpoint-6"
    sharded.mkdir()
    with warnings.catch_warnings():  # "torch.distributed is disabled": one process, no group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}},
                 checkpoint_id=str(sharded / "pytorch_model_fsdp_0"))  # fmt: skip
    shutil.copy(run / "checkpoint-4" / "config.json", sharded / "config.json")
    (sharded / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    uri = mlflow_store(base)
    client = MlflowClient(uri)
    experiment = client.create_experiment("fuzz")
    earlier, run_id = (client.create_run(experiment).info.run_id for _ in range(2))
    journal = Journal(run / "uma")
    for record in journal.records():  # a delivery log naming another run: read, never trusted
        journal.mark_delivered("mlflow", earlier, record.record_id, uri=uri)
    assert torch.get_num_threads() >= 1 and len(journal.records()) >= 4
    return base, run_id


def _mutate(path: Path, how: str, rng: random.Random, outside: Path) -> None:
    """Apply one mutation to the file ``path``."""
    data = path.read_bytes()
    if how in ("retype", "huge") and path.suffix not in (".json", ".jsonl"):
        how = "flip"  # binary files: a flipped byte instead
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data)) if data else 0])
    elif how == "flip":
        if data:
            i = rng.randrange(len(data))
            path.write_bytes(data[:i] + bytes([data[i] ^ rng.randrange(1, 256)]) + data[i + 1 :])
    elif how == "deep":
        if path.suffix == ".jsonl":
            lines = data.split(b"\n")
            lines.insert(rng.randrange(len(lines)), DEEP.encode())
            path.write_bytes(b"\n".join(lines))
        else:
            path.write_text(DEEP)
    elif how == "retype":
        path.write_bytes(_retyped(data, path.suffix == ".jsonl", rng))
    elif how == "huge":
        numbers = list(re.finditer(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?", data))
        if numbers:
            m = rng.choice(numbers)
            big = rng.choice([b"1e308", b"-1e308", b"1" + b"0" * 30, b"1e999", b"9" * 5000])
            path.write_bytes(data[: m.start()] + big + data[m.end() :])
    elif how in ("symlink", "hardlink"):
        path.unlink()
        (os.symlink if how == "symlink" else os.link)(outside, path)


def _retyped(data: bytes, lines: bool, rng: random.Random) -> bytes:
    """One field (at any depth) replaced by a value of another type; journal lines re-checksummed."""
    if lines:
        rows = [r for r in data.split(b"\n") if r.strip()]
        i = rng.randrange(len(rows))
        payload = json.loads(rows[i])["record"]
        _retype_one(payload, rng)
        rows[i] = _checked_line(payload).rstrip(b"\n")  # a valid checksum: only the content is odd
        return b"\n".join(rows) + b"\n"
    try:
        content = json.loads(data)
    except ValueError:
        return data[::-1]
    if not isinstance(content, (dict, list)) or not content:
        return json.dumps(rng.choice(ODD)).encode()
    _retype_one(content, rng)
    return json.dumps(content).encode()


def _retype_one(node, rng: random.Random) -> None:
    """Walk down a random path of dicts/lists and replace the value found there."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = rng.choice(keys)
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
            node = child
            continue
        node[key] = rng.choice([v for v in ODD if type(v) is not type(child)])
        return


def _intact_records(base_journal: Path, journal: Path) -> list[Record]:
    """The base run's records whose line is still, byte for byte, a line of ``journal``."""
    try:
        readable = journal.is_file() and not journal.is_symlink()
        now = set(journal.read_bytes().split(b"\n")) if readable else set()
    except OSError:
        now = set()
    kept = []
    for line in base_journal.read_bytes().split(b"\n"):
        if line.strip() and line in now:
            kept.append(Record.from_dict(json.loads(line)["record"]))
    return kept


def _new_record(base_journal: Path) -> Record:
    """A record as the next save of the same training run makes it (its ``run``, when records carry one)."""
    first = json.loads(base_journal.read_bytes().split(b"\n")[0])["record"]
    fields = {"step": 1000, "metric": "fuzz", "status": "ok", "scalars": {"x": 1.0}, "cache_key": "fuzz-1000"}
    return Record.from_dict({**fields, **({"run": first["run"]} if "run" in first else {})})


def _in_mlflow(client, run_id: str, record: Record) -> bool:
    from uma_callbacks.integrations.base import tracker_key

    values = record.log_values()
    if not values:
        return True  # nothing to log (an error record)
    key = tracker_key(sorted(values)[0])
    return record.step in {m.step for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: each example costs seconds; the note names it
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(CLASSES),
    pick=st.integers(0, 10**6),
    how=st.sampled_from(MUTATIONS),
    seed=st.integers(0, 2**32 - 1),
)
@example(kind="journal", pick=1, how="retype", seed=1)  # uma/journal.jsonl: a checksummed odd record
@example(kind="journal", pick=1, how="deep", seed=0)
@example(kind="journal", pick=0, how="deep", seed=0)  # uma/deliveries.jsonl
@example(kind="checkpoint-json", pick=2, how="deep", seed=0)  # checkpoint-2/trainer_state.json
@example(kind="result-json", pick=0, how="retype", seed=2)
@example(kind="result-arrays", pick=0, how="flip", seed=3)
@example(kind="probe", pick=0, how="retype", seed=4)
def test_one_mutated_file_breaks_no_command_and_loses_no_other_record(
    run_folder, kind, pick, how, seed, capsys
):
    from mlflow.tracking import MlflowClient

    from uma_callbacks.engine.delivery import Delivery
    from uma_callbacks.integrations.mlflow import MLflowSink

    base, run_id = run_folder
    classes = _files_by_class(base / "run")
    assert set(classes) == set(CLASSES), sorted(classes)  # the folder holds every kind of file
    rel = classes[kind][pick % len(classes[kind])]
    with tempfile.TemporaryDirectory(prefix="uma-fuzz-") as scratch:
        work = Path(scratch) / "b"
        shutil.copytree(base, work, symlinks=True)
        run, uri = work / "run", f"sqlite:///{work / 'mlflow.db'}"
        outside = Path(scratch) / "outside.txt"
        outside.write_text('{"secret": "not part of the run"}\n')
        _mutate(run / rel, how, random.Random(seed), outside)
        note = f"{how} of {rel} (seed {seed})"

        # a save: a new record journalled and delivered while training goes on
        journal = Journal(run / "uma")
        new = _new_record(base / "run" / "uma" / JOURNAL_FILE)
        journal.append(new)
        sink = MLflowSink(run_id=run_id, tracking_uri=uri)
        Delivery(journal, [sink], [sink]).send([new])

        codes = {
            "sync": main(["sync", str(run), "--mlflow-run", run_id, "--tracking-uri", uri]),
            "report": main(["report", str(run), "--out", str(Path(scratch) / "report")]),
            "backfill": main(["backfill", str(run), "--metrics", "gradient_flow", "--no-figures", "--no-trajectory",
                              "--device", "cpu", "--mlflow-run", run_id, "--tracking-uri", uri]),  # fmt: skip
        }
        capsys.readouterr()
        for command, code in codes.items():
            assert code in EXIT_CODES[command], f"uma {command} exited {code} after {note}"
        client = MlflowClient(uri)
        expected = _intact_records(base / "run" / "uma" / JOURNAL_FILE, run / "uma" / JOURNAL_FILE)
        if (run / "uma" / JOURNAL_FILE).is_file() and not (run / "uma" / JOURNAL_FILE).is_symlink():
            expected.append(new)
        missing = [(r.step, r.metric) for r in expected if not _in_mlflow(client, run_id, r)]
        assert not missing, f"records not delivered after {note}: {missing}"
