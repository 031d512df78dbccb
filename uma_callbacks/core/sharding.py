r"""Sharded models: FSDP2 ``fully_shard`` and DTensor parameters.

Detection, shard slicing, per-rank memory accounting, and the refusal of DeepSpeed ZeRO-3
placeholders.

Under FSDP2 every parameter is a ``DTensor`` whose local piece is the rank's dim-0 chunk of
the full tensor (``Shard(0)`` on a 1-D mesh; ``torch.chunk`` sizes, ceil(d0 / R) rows per
rank, the last ranks possibly shorter or empty). During a block's forward/backward FSDP
swaps in the all-gathered full parameter; outside it only the shard exists.

The metrics keep this layout: per-sample statistics of a parameter (sum_i g_i, sum_i g_i^2,
[d0, ...]) are formed full-size for ONE layer at a time, from the rank's own samples, and
reduced at once into the rank's shard by a reduce-scatter
(:meth:`~uma_callbacks.core.distributed.Collective.sum_scatter_dim0`), so a rank holds its
shard of every accumulator (P / R entries) plus one layer's full tensor::

    acc_r += rows_r( sum_{ranks q} full_q )        # reduce-scatter, never an all-gather

Norms over a parameter are then sum over ranks of the local sums of squares (all-reduce of
one scalar per parameter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False when unavailable)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard``, TP).

    Example:
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    return any(is_dtensor(p) for p in model.parameters())


def check_dim0_sharding(name: str, param: torch.Tensor) -> None:
    """Raise ``NotImplementedError`` unless ``param`` is plain or ``Shard(0)`` on a 1-D mesh.

    FSDP2's default layout; HSDP (2-D mesh), tensor parallelism and ``shard_placement_fn``
    layouts on other dims are not supported by the metrics.
    """
    if not is_dtensor(param):
        return
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(
            f"parameter {name!r} is sharded as {placements} on a {param.device_mesh.ndim}-D mesh; "
            "the metrics support FSDP2's Shard(0) on a 1-D mesh only"
        )


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's piece of ``t`` (``to_local()`` of a DTensor; ``t`` itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


def local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (shaped like ``param``'s full tensor) this rank's shard holds.

    Args:
        full: ``[d0, ...]``, the full-size tensor.
        param: the (possibly DTensor) parameter giving the layout.

    Returns:
        ``full`` itself for a plain parameter, else its dim-0 slice at the shard's offset.
    """
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return full.narrow(0, int(offset[0]), int(shape[0])) if full.dim() else full


def local_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: local piece}`` of ``params`` (the model's own storage, not copies)."""
    return {n: local(p) for n, p in params.items()}


@dataclass
class ShardBytes:
    """Per-rank bytes of a sharded model (what the memory planner counts as fixed).

    Attributes:
        shard: bytes of this rank's shards of the trainable parameters.
        full: bytes of the full (gathered) trainable parameters.
        largest_block: bytes of the largest FSDP unit's full parameters (what FSDP gathers
            at once; the root's own parameters count as one unit).
    """

    shard: int
    full: int
    largest_block: int

    @property
    def fixed(self) -> int:
        """The shard plus the largest gathered block: the fixed bytes of a rank."""
        return self.shard + self.largest_block


def shard_bytes(model: torch.nn.Module) -> ShardBytes:
    """:class:`ShardBytes` of ``model`` (on a plain model: shard = full = largest block).

    FSDP units are the modules that are ``FSDPModule`` instances; a parameter belongs to
    the innermost unit containing it.
    """
    units = _fsdp_units(model)
    owner: dict[int, str] = {}
    for unit_name in sorted(units, key=len):  # inner units (longer names) overwrite outer ones
        for p in units[unit_name].parameters():
            owner[id(p)] = unit_name
    per_unit: dict[str, int] = {}
    shard = full = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        nbytes = p.numel() * p.element_size()  # numel() of a DTensor is the global count
        full += nbytes
        shard += local(p).numel() * p.element_size()
        unit = owner.get(id(p), "")
        per_unit[unit] = per_unit.get(unit, 0) + nbytes
    largest = max(per_unit.values()) if per_unit else 0
    return ShardBytes(shard=shard, full=full, largest_block=largest if units else full)


def _fsdp_units(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}


# ---------------------------------------------------------------------------- fingerprint
def sharded_fingerprint(items: Mapping[str, torch.Tensor]) -> str:
    """:func:`~uma_callbacks.engine.snapshot.weights_fingerprint` of parameters some of which are DTensors.

    It is the one-process fingerprint of the full tensors, the same string on every rank,
    with no rank ever holding a full parameter.

    The fingerprint is SHA-256 over ``name|dtype|shape|`` and the row-major bytes of each
    full tensor, in name order. Under ``Shard(0)`` those bytes are the ranks' shards one
    after the other, so rank 0 streams its own shard into the hash, then receives each
    other rank's shard of the same parameter (point-to-point, one shard at a time) and
    streams it in; the digest is then broadcast. Rank 0 holds one extra shard at a time,
    the others only send what they hold. Other layouts (``Replicate``, 2-D meshes) are
    gathered one parameter at a time (``full_tensor()``). Plain tensors are hashed from
    rank 0's copy (replicated by definition).

    Every rank must call it with the same names (a collective).

    Args:
        items: ``{name: tensor}``, DTensor or plain.

    Returns:
        64 hex characters, equal on every rank.

    Raises:
        NotImplementedError: a DTensor whose mesh leaves out world rank 0.
    """
    import hashlib

    import torch.distributed as dist

    rank = dist.get_rank()
    digest = hashlib.sha256() if rank == 0 else None
    for name in sorted(items):
        t = items[name].detach()
        if digest is not None:
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if not is_dtensor(t):
            if digest is not None:
                _hash_bytes(digest, t)
            continue
        group = t.device_mesh.get_group() if t.device_mesh.ndim == 1 else None
        members = dist.get_process_group_ranks(group) if group is not None else []
        if group is None or not _is_dim0_shard(t) or t.dim() == 0:
            full = t.full_tensor()  # one parameter gathered, then dropped
            if digest is not None:
                _hash_bytes(digest, full)
            del full
            continue
        if 0 not in members:
            raise NotImplementedError(f"parameter {name!r} is sharded on a mesh without world rank 0: {members}")
        _stream_dim0_shards(digest, t, members, group)
    box = [digest.hexdigest() if digest is not None else ""]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _is_dim0_shard(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    return len(placements) == 1 and placements[0] == Shard(0)


def _stream_dim0_shards(digest: Any, t: torch.Tensor, members: list[int], group: Any) -> None:
    """Rank 0 hashes the shards of ``t`` in mesh order; the other members send theirs to it."""
    import torch.distributed as dist

    rank = dist.get_rank()
    piece = t.to_local().contiguous()
    rows = [len(c) for c in torch.empty(t.shape[0], device="meta").chunk(len(members))]
    rows += [0] * (len(members) - len(rows))  # torch.chunk gives fewer pieces when d0 < R
    inner = tuple(t.shape[1:])
    if rank != 0:
        if rank in members and piece.numel():
            dist.send(piece, dst=0, group=group)
        return
    for position, member in enumerate(members):
        if member == 0:
            _hash_bytes(digest, piece)
        elif rows[position] * math.prod(inner):  # the sender sends iff its piece has entries
            buffer = torch.empty((rows[position], *inner), dtype=piece.dtype, device=piece.device)
            dist.recv(buffer, src=member, group=group)
            _hash_bytes(digest, buffer)
            del buffer


def _hash_bytes(digest: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s row-major bytes to ``digest``."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel():
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


# ---------------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class GhostChunk:
    """A chunk run only so that every rank takes part in FSDP's collectives; it adds nothing.

    Attributes:
        batch: a real local chunk, re-run with its contributions discarded.
    """

    batch: Any


def aligned_chunks(chunks: Iterable[Any], collective: Any) -> Iterator[Any]:
    """``chunks``, padded with :class:`GhostChunk` s to the most chunks any rank has.

    Under FSDP every forward/backward all-gathers and reduce-scatters, so every rank must
    run as many as the others. The counts are shared by one all-reduce (one slot per rank).

    Raises:
        ValueError: this rank has no chunk while another has some (every rank needs a sample).
    """
    items = list(chunks)
    if collective.world_size <= 1:
        yield from items
        return
    counts = torch.zeros(collective.world_size, dtype=torch.float64)
    counts[collective.rank] = float(len(items))
    collective.sum_([counts])
    most = int(counts.max().item())
    if most and not items:
        raise ValueError(
            f"rank {collective.rank} has no probe samples while another has {most} chunk(s); "
            "under FSDP every rank needs at least one sample (use a probe of at least world_size batches)"
        )
    yield from items
    for i in range(most - len(items)):
        yield GhostChunk(items[i % len(items)])


def unwrap(chunk: Any) -> tuple[Any, bool]:
    """``(batch, real)``: the batch to run and whether its contributions count."""
    if isinstance(chunk, GhostChunk):
        return chunk.batch, False
    return chunk, True


# ---------------------------------------------------------------------------- DeepSpeed
def deepspeed_zero3_reason(model: torch.nn.Module | None = None) -> str:
    """Why the metrics refuse this run (DeepSpeed ZeRO-3 partitioned parameters), or ``""``.

    ZeRO-3 replaces every parameter by an empty placeholder (attributes ``ds_id``,
    ``ds_numel``) gathered only inside DeepSpeed's own hooks; measuring the placeholders
    would give wrong numbers, gathering them all would undo the partitioning.
    """
    zero3 = False
    if model is not None:
        zero3 = any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in model.parameters())
    if not zero3:
        try:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            zero3 = bool(is_deepspeed_zero3_enabled())
        except ImportError:  # an old transformers without the helper
            zero3 = False
    if not zero3:
        return ""
    return (
        "uma_callbacks does not measure DeepSpeed ZeRO-3 runs: the parameters are partitioned placeholders "
        "(ds_id/ds_numel) that only DeepSpeed's hooks gather. Use ZeRO-1/2 (parameters whole on every rank), "
        "PyTorch FSDP2 (fully_shard), or backfill the saved checkpoints with `uma backfill`."
    )


#: Why a metric is skipped on a sharded model, where more than "not supported yet" is known.
SHARDED_SKIP_REASONS = {
    "hessian": (
        "hessian needs double backward (Hessian-vector products through the first backward's graph); "
        "under FSDP2 the full parameters exist only inside FSDP's forward/backward hooks, which free them "
        "and reduce-scatter the gradients, so the products come out wrong (zero) rather than failing: skipped. "
        "Measure the Hessian with `uma backfill` on the saved (gathered) checkpoints"
    ),
}


def sharded_skip_reason(name: str) -> str:
    """The skip message of metric ``name`` on a sharded (FSDP2 / DTensor) model."""
    return SHARDED_SKIP_REASONS.get(
        name,
        f"{name} does not support sharded (FSDP2 / DTensor) models yet: skipped rather than gathering every "
        "parameter on every rank; measure it with `uma backfill` on the saved checkpoints",
    )


def reshard_fsdp(model: torch.nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model`` (a no-op on plain models and sharded units).

    FSDP2 keeps the root's all-gathered parameters after a forward without backward; once
    the shards are moved in place (landscape, interpolation) that gathered copy is stale,
    so the moves are followed by this, and the next forward all-gathers the moved shards.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_range(param: torch.Tensor) -> tuple[tuple[int, ...], int, int]:
    """``(full shape, lo, hi)``: the rank's piece of ``param`` is entries ``[lo, hi)`` of the flattened full tensor.

    Under ``Shard(0)`` the piece is whole dim-0 rows; a plain tensor gives ``(shape, 0, numel)``.
    """
    shape = tuple(param.shape)
    if not is_dtensor(param):
        return shape, 0, param.numel()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    lshape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    inner = 1
    for d in shape[1:]:
        inner *= int(d)
    if not shape:
        return shape, 0, 1
    lo = int(offset[0]) * inner
    return shape, lo, lo + int(lshape[0]) * inner


def local_entries(params: Mapping[str, torch.Tensor]) -> int:
    """Entries this rank holds of ``params``: the sum of the local pieces' sizes.

    That is the length of a flat vector kept in the shards' layout (the full count on plain
    parameters).
    """
    return sum(local(p).numel() for p in params.values())


def sharded_start_vector(
    params: Mapping[str, torch.Tensor], seed: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """This rank's piece ``[local entries]`` of a Gaussian vector over the full parameters, the same for any world size.

    Each parameter's full tensor is drawn from its own generator, seeded from (``seed``, the
    parameter's index), and sliced to this rank's entries (one parameter's full draw alive
    at a time).

    Example:
        >>> v = sharded_start_vector({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, 0, torch.float64, "cpu")
        >>> v.shape
        torch.Size([10])
    """
    import numpy as np

    pieces = []
    for index, param in enumerate(params.values()):
        shape, lo, hi = local_range(param)
        mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator(device="cpu").manual_seed(int(mixed.view(np.uint64)[0]) >> 1)
        draw = torch.randn(math.prod(shape), generator=gen, dtype=torch.float64)
        pieces.append(draw[lo:hi].to(dtype))
        del draw
    return torch.cat(pieces).to(device) if pieces else torch.zeros(0, dtype=dtype, device=device)


def reset_fsdp_forward(model: torch.nn.Module) -> None:
    """Clear FSDP2's "root forward in progress" marker left by a forward that raised.

    FSDP2 sets ``iter_forward_root`` in the root's pre-forward and clears it in its
    post-forward; a forward that raises midway (an earlier metric, a failed memory probe)
    leaves it set, and every later forward then skips the root's all-gather (the embedding
    sees its shard: "mixed torch.Tensor and DTensor").
    """
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        ctx = getattr(get_state(), "_state_ctx", None)
        if ctx is not None and getattr(ctx, "iter_forward_root", None) is not None:
            ctx.iter_forward_root = None
