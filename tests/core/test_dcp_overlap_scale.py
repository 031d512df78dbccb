"""Issue 29: the DCP chunk check is O(n log n), exact, and still refuses overlaps and gaps.

The pairwise check took 7 s for 4,000 chunks (about an hour for 100,000) before any
budget check; :func:`~uma_callbacks.core.tiling.tiling_fault` decides the same thing with
one sort of the chunks' corners. It is compared here with the pairwise definition on
random layouts (grids, uneven guillotine cuts, a pinwheel, forged overlaps and gaps);
100,000 chunks in one to three dimensions are checked in well under a second or two, and
so are the 20,000 chunks of a real DCP folder's metadata (the pairwise check: about 3 min).
"""

from __future__ import annotations

import itertools
import pickle
import random
import time

import numpy as np
import pytest
import torch

from tests.cases import tiny_qwen2
from uma_callbacks.core.dcp import plan_dcp, read_metadata
from uma_callbacks.core.tiling import tiling_fault

MODEL = "pytorch_model_fsdp_0"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _exact(size, boxes) -> bool:
    """The definition: every entry of the tensor in exactly one box (brute force)."""
    count = np.zeros(size, dtype=np.int64)
    for o, s in boxes:
        count[tuple(slice(a, a + b) for a, b in zip(o, s))] += 1
    return bool(np.all(count == 1))


def _guillotine(rng: random.Random, lo: tuple[int, ...], hi: tuple[int, ...], depth: int) -> list:
    """Random boxes tiling [lo, hi): recursive cuts along random dimensions (uneven sizes)."""
    dims = [k for k in range(len(lo)) if hi[k] - lo[k] > 1]
    if depth == 0 or not dims or rng.random() < 0.15:
        return [(lo, tuple(b - a for a, b in zip(lo, hi)))]
    k = rng.choice(dims)
    cut = rng.randrange(lo[k] + 1, hi[k])
    left_hi = hi[:k] + (cut,) + hi[k + 1 :]
    right_lo = lo[:k] + (cut,) + lo[k + 1 :]
    return _guillotine(rng, lo, left_hi, depth - 1) + _guillotine(rng, right_lo, hi, depth - 1)


def _forge(rng: random.Random, size, boxes) -> list:
    """A layout with the same volume that is wrong: a box moved, or two boxes swapped in size."""
    boxes = list(boxes)
    i = rng.randrange(len(boxes))
    o, s = boxes[i]
    k = rng.randrange(len(size))
    room = size[k] - s[k]
    if room > 0:
        o = o[:k] + (rng.randrange(room + 1),) + o[k + 1 :]
    boxes[i] = (o, s)
    return boxes


@pytest.mark.parametrize("seed", range(40))
def test_the_corner_check_agrees_with_the_definition(seed):
    rng = random.Random(seed)
    d = 1 + seed % 4
    size = tuple(rng.randint(1, 7) for _ in range(d))
    boxes = _guillotine(rng, (0,) * d, size, depth=6)
    boxes += [((0,) * d, (0,) * d)] * (seed % 2)  # an empty chunk changes nothing
    assert tiling_fault(size, boxes) is None
    for _ in range(5):
        forged = _forge(rng, size, boxes)
        assert (tiling_fault(size, forged) is None) == _exact(size, forged), forged


def test_a_pinwheel_tiles_and_its_overlapping_twin_does_not():
    pinwheel = [((0, 0), (2, 1)), ((2, 0), (1, 2)), ((1, 2), (2, 1)), ((0, 1), (1, 2)), ((1, 1), (1, 1))]
    assert _exact((3, 3), pinwheel) and tiling_fault((3, 3), pinwheel) is None
    twin = pinwheel[:4] + [((0, 0), (1, 1))]  # same volume: the centre uncovered, a corner twice
    message = tiling_fault((3, 3), twin, what="chunks of 'w'")
    assert message == "two chunks of 'w' overlap at (0, 0): offsets (0, 0) and (0, 0)"
    gap_first = [((0, 1), (1, 2)), ((1, 0), (2, 3)), ((1, 0), (1, 1))]  # (0, 0) in none, (1, 0) twice
    assert "lies in none" in tiling_fault((3, 3), gap_first)
    assert "hold 8 entries" in tiling_fault((3, 3), pinwheel[:4])


def _grid_entry(rows: int, cols: int):
    """Metadata pieces for a ``rows x cols`` float64 tensor cut into 1 x 1 chunks."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    return [ChunkStorageMetadata(offsets=torch.Size([r, c]), sizes=torch.Size([1, 1])) for r in range(rows) for c in range(cols)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("dcp") / "checkpoint-1" / MODEL
    dcp.save({"model": {k: v.clone() for k, v in tiny_qwen2().state_dict().items()}}, checkpoint_id=str(folder))
    return folder


def _many_chunks(folder, n_rows: int, n_cols: int, change=None) -> None:
    """Rewrite ``model.lm_head.weight`` as an (n_rows, n_cols) tensor of 1 x 1 chunks, all
    backed by the first bytes of one real data file (the plan reads no tensor)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = read_metadata(folder)
    key = "model.lm_head.weight"
    entry = metadata.state_dict_metadata[key]
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == key)
    for k in [k for k in metadata.storage_data if k.fqn == key]:
        del metadata.storage_data[k]
    entry.size = torch.Size([n_rows, n_cols])
    entry.chunks = _grid_entry(n_rows, n_cols)
    if change is not None:
        change(entry.chunks)
    for chunk in entry.chunks:
        metadata.storage_data.setdefault(MetadataIndex(fqn=key, offset=chunk.offsets), info)
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)


def _timed_check(monkeypatch) -> list[float]:
    """Seconds spent in the DCP chunk check, call by call (the plan around it unpickles two objects per chunk)."""
    from uma_callbacks.core import dcp

    seconds: list[float] = []
    real = dcp._check_cover

    def timed(*args):
        started = time.perf_counter()
        try:
            return real(*args)
        finally:
            seconds.append(time.perf_counter() - started)

    monkeypatch.setattr(dcp, "_check_cover", timed)
    return seconds


def test_20k_chunks_of_a_real_dcp_folder_are_checked_in_under_a_second(checkpoint, monkeypatch):
    _many_chunks(checkpoint, 200, 100)
    seconds = _timed_check(monkeypatch)
    plan = plan_dcp(checkpoint)
    [head] = [t for t in plan.tensors if t.key == "model.lm_head.weight"]
    assert len(head.pieces) == 20_000
    assert sum(seconds) < 1.0, f"checking 20,000 chunks took {sum(seconds):.2f} s"


def test_20k_chunks_with_one_duplicated_are_refused_quickly(checkpoint, monkeypatch):
    _many_chunks(checkpoint, 200, 100, lambda chunks: chunks.__setitem__(-1, chunks[0]))
    seconds = _timed_check(monkeypatch)
    with pytest.raises(ValueError, match=r"two chunks of 'model.lm_head.weight' overlap at \(0, 0\)"):
        plan_dcp(checkpoint)
    assert sum(seconds) < 2.0


def _grid(shape: tuple[int, ...]) -> list:
    return [(idx, (1,) * len(shape)) for idx in itertools.product(*(range(n) for n in shape))]


@pytest.mark.parametrize("shape", [(100_000,), (400, 250), (50, 40, 50)])
def test_100k_boxes_in_one_to_three_dimensions_take_well_under_a_second_or_two(shape):
    boxes = _grid(shape)
    started = time.perf_counter()
    assert tiling_fault(shape, boxes) is None
    moved = boxes[:-1] + [(tuple(n // 2 for n in shape), boxes[-1][1])]  # the last entry uncovered, the middle twice
    assert "overlap" in tiling_fault(shape, moved)
    assert time.perf_counter() - started < 3.0  # two checks


def test_a_check_beyond_the_bound_is_refused_not_run(monkeypatch):
    from uma_callbacks.core import tiling

    grid = [(bits, (1, 1, 1)) for bits in itertools.product((0, 1), repeat=3)]  # 8 chunks x 8 corners
    assert tiling_fault((2, 2, 2), grid) is None
    whole_rows = [((0, 0, i), (2, 2, 1)) for i in range(2)]  # split along one dimension only: 2 x 2 corners
    monkeypatch.setattr(tiling, "MAX_CORNERS", 16)
    assert "too many to check" in tiling_fault((2, 2, 2), grid)
    assert tiling_fault((2, 2, 2), whole_rows) is None
