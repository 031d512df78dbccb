r"""Activation capture shared by the activation-based metrics (representations, information, attention).

Which modules:

- :func:`find_blocks`: the transformer blocks of a HF decoder or encoder (Qwen2, Llama,
  GPT-2, BERT, MiniLM, ...): the ``nn.ModuleList`` holding the most parameters whose items
  all share one class (``model.layers``, ``transformer.h``, ``bert.encoder.layer``).
- :func:`find_mlp`: a block's MLP, as two modules: the output projection, whose *input* is
  the hidden activation ``[B, T, h]`` (``down_proj``, ``c_proj``, ``fc2``, BERT's
  ``output.dense``), and the read-in projection whose weight rows are the hidden units
  (``gate_proj`` else ``up_proj``, ``c_fc``, ``fc1``, BERT's ``intermediate.dense``).
- :func:`resolve_layers`: user-named modules of any ``nn.Module`` (each module's own output
  is its state and its units), else the blocks, else every leaf with a 2-D ``weight``.

Which tokens: the non-padding tokens (``attention_mask`` when the batch has one) of the
probe, at most ``max_tokens`` of them, chosen by bottom-k sampling on a key that depends
only on the sample's content, the token's position among its sample's non-padding tokens
and ``seed``:

    key(sample, t) = splitmix64(hash(sample) ^ splitmix64(seed) + t) / 2^64,

and the ``max_tokens`` smallest keys are kept. This is a uniform sample without
replacement, the same token positions at every checkpoint (the probe is frozen), whatever
the chunking, the batch order, the padding side or the sharding over ranks. Selected
tokens are returned in key order, so their rows line up across layers and checkpoints.

:func:`capture_tokens` runs the probe through the model with forward hooks, keeps the
selected tokens' states per layer (streamed: a chunk adds its candidates to a bottom-k
buffer, so at most ``max_tokens`` + one chunk's candidates are held), gathers them across
ranks through sum all-reduces, and stops each forward after the last layer when the
model's output is not needed.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from uma_callbacks.core.batches import count_samples
from uma_callbacks.core.distributed import Collective, LocalCollective

#: (output projection, read-in projections in order of preference) of a block's MLP.
_MLP_NAMES = (
    ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),  # Llama, Qwen2, Mistral
    ("mlp.c_proj", ("mlp.c_fc",)),  # GPT-2
    ("mlp.fc2", ("mlp.fc1",)),  # Phi, OPT-style
    ("fc2", ("fc1",)),
    ("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),  # GPT-NeoX
    ("output.dense", ("intermediate.dense",)),  # BERT, MiniLM
    ("ffn.lin2", ("ffn.lin1",)),  # DistilBERT
)


@dataclass(frozen=True)
class Layer:
    """One captured layer.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module: the module; its output ``[B, T, d]`` (or ``[B, d]``) is the layer's state.
        units: the module whose *input* holds the hidden units counted as dead or alive
            (a block's MLP output projection); ``None``: the layer's own output units.
        read_in: the module whose weight rows W_i are the hidden units (superposition);
            ``None`` when there is none.
        own_units: the layer's own output units are its hidden units (user-named modules
            and plain networks); a block without a recognised MLP has none.
    """

    name: str
    module: torch.nn.Module
    units: torch.nn.Module | None = None
    read_in: torch.nn.Module | None = None
    own_units: bool = False


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks of ``model``, in order, as ``[(name, module)]``.

    The ``nn.ModuleList`` with the most parameters among those whose (two or more) items
    all share one class; ``[]`` when there is none (a plain network).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10, n_positions=8))
        >>> [name for name, _ in find_blocks(m)]
        ['transformer.h.0', 'transformer.h.1']
    """
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 1:
            continue
        if len({type(item) for item in module}) != 1 or not any(True for _ in module[0].parameters()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        return []
    _, name, blocks = best
    return [(f"{name}.{i}" if name else str(i), block) for i, block in enumerate(blocks)]


def find_mlp(block: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None] | None:
    """``(output projection, read-in projection)`` of a block's MLP, or ``None`` if not found."""
    named = dict(block.named_modules())
    for out_name, in_names in _MLP_NAMES:
        if out_name in named:
            read_in = next((named[n] for n in in_names if n in named), None)
            return named[out_name], read_in
    return None


def weight_rows(module: torch.nn.Module | None) -> torch.Tensor | None:
    """The weight as rows of hidden units, ``W [h, d]``; ``None`` without a 2-D weight.

    ``nn.Linear``: ``weight``; HF ``Conv1D``: ``weight.T``.
    """
    weight = getattr(module, "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return weight.detach().T if type(module).__name__ == "Conv1D" else weight.detach()


def resolve_layers(model: torch.nn.Module, modules: Sequence[str] | None = None, field_name: str = "modules") -> list[Layer]:
    """The layers to capture.

    Args:
        model: any ``nn.Module``.
        modules: names from ``model.named_modules()``; ``None``: the transformer blocks
            (:func:`find_blocks`, with their MLPs), else every module with a 2-D weight.
        field_name: the argument's name for error messages (``"Representations.modules"``).

    Raises:
        ValueError: a name that is not a module of the model (the closest ones listed), or
            nothing to capture.
    """
    named = dict(model.named_modules())
    if modules is not None:
        missing = [m for m in modules if m not in named]
        if missing:
            import difflib

            close = difflib.get_close_matches(missing[0], list(named), n=3)
            raise ValueError(f"{field_name} names modules the model does not have: {missing}; closest: {close}")
        return [Layer(m, named[m], None, named[m] if weight_rows(named[m]) is not None else None, True) for m in modules]
    blocks = find_blocks(model)
    if blocks:
        out = []
        for name, block in blocks:
            mlp = find_mlp(block)
            out.append(Layer(name, block, *(mlp if mlp else (None, None))))
        return out
    layers = [Layer(n, m, None, m, True) for n, m in named.items() if n and weight_rows(m) is not None and not list(m.children())]
    if not layers:
        raise ValueError(f"{field_name}: the model has no transformer blocks and no 2-D weights; name the modules to capture")
    return layers


# ---------------------------------------------------------------------- token keys
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrap-around arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def token_keys(sample_hashes: np.ndarray, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Keys in [0, 1) of tokens ``[B, T]``: splitmix64(hash ^ splitmix64(seed) + position) / 2^64.

    Args:
        sample_hashes: ``uint64 [B]``, one per sample (:func:`sample_hashes`).
        positions: ``[B, T]`` integer positions among the sample's non-padding tokens.
        seed: the sampling seed.

    Returns:
        ``float64 [B, T]`` (53 significant bits, exact in float64).
    """
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        base = (np.asarray(sample_hashes, dtype=np.uint64) ^ salt)[:, None]
        pos = positions.cpu().numpy().astype(np.int64).astype(np.uint64)
        mixed = _splitmix64((base + pos) & _MASK64)
    return torch.from_numpy((mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def sample_hashes(batch: Any, mask: torch.Tensor | None) -> np.ndarray:
    """``uint64 [B]``: a hash of each sample's content, independent of padding and batch order.

    The content is the sample's non-padding ``input_ids`` when the batch has them, else
    every tensor field's row.
    """
    n = count_samples(batch)
    out = np.zeros(n, dtype=np.uint64)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    for i in range(n):
        digest = hashlib.blake2b(digest_size=8)
        if isinstance(ids, torch.Tensor):
            row = ids[i]
            if mask is not None and mask.shape == ids.shape:
                row = row[mask[i].to(row.device)]
            digest.update(row.detach().cpu().to(torch.int64).numpy().tobytes())
        else:
            for key, tensor in _tensor_fields(batch):
                if tensor.dim() >= 1 and tensor.shape[0] == n:
                    digest.update(key.encode())
                    digest.update(tensor[i].detach().cpu().contiguous().numpy().tobytes())
        out[i] = np.frombuffer(digest.digest(), dtype=np.uint64)[0]
    return out


def _tensor_fields(batch: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("", batch)]
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])) if isinstance(v, torch.Tensor)]
    if isinstance(batch, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]
    return []


def batch_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask [B, T]`` as bool, or ``None``."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def next_token_ids(batch: Any, mask: torch.Tensor) -> torch.Tensor | None:
    """``[B, T]`` the next non-padding token's id after each position; ``None`` without ``input_ids``.

    That is ``input_ids[t + 1]``, and -1 at a sample's last token.
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.shape != mask.shape:
        return None
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = torch.where(mask[:, 1:].to(ids.device), ids[:, 1:], -1)
    return nxt


def class_labels(batch: Any, rows: int) -> torch.Tensor | None:
    """``[B]`` the class label of each sample (a classification head's ``labels``); ``None`` otherwise."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.shape != (rows,) or labels.is_floating_point():
        return None
    return labels


# ---------------------------------------------------------------------- forward
class _StopForward(Exception):
    """Raised by the last layer's hook to end a forward whose output is not needed."""


def run_forward(model: torch.nn.Module, batch: Any, loss_fn: Callable[[torch.nn.Module, Any], Any]) -> None:
    """One forward pass: ``model(**inputs)`` for HF batches, else ``loss_fn(model, batch)``.

    HF batches run without labels and without the KV cache; for anything else the user's
    loss knows how to call a plain model.
    """
    if isinstance(batch, Mapping) and ("input_ids" in batch or "inputs_embeds" in batch) and hasattr(model, "config"):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "use_cache" in inspect.signature(model.forward).parameters:
            inputs["use_cache"] = False
        model(**inputs)
    else:
        loss_fn(model, batch)


def model_logits(output: Any) -> torch.Tensor | None:
    """The logits of a model output (``.logits``, the first item of a tuple, or the tensor)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output if isinstance(output, torch.Tensor) else None


def _first_tensor_of(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "last_hidden_state"):
        return obj.last_hidden_state
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


def _as_tokens(t: torch.Tensor, where: str) -> torch.Tensor:
    """``[B, T, w]`` from ``[B, T, w]`` or ``[B, w]``.

    Raises:
        ValueError: any other shape (``where`` names the layer).
    """
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"activation capture: {where} gives shape {tuple(t.shape)}; expected [B, T, d] or [B, d]")
    return t


# ---------------------------------------------------------------------- capture
@dataclass
class TokenStates:
    """What :func:`capture_tokens` returns.

    Attributes:
        states: ``{stream: [n, w]}``: ``"layers/<i>"`` (layer i's output), ``"input"`` (the
            first layer's input: the embeddings of a transformer), ``"next"`` (next-token
            ids, ``[n]`` long), ``"label"`` (the sample's class label, ``[n]``, when asked and
            the probe has them). Rows are the selected tokens in key order.
        keys: ``float64 [n]`` their keys (ascending).
        n_tokens: non-padding tokens in the whole probe (all ranks).
        unit_max: ``{"layers/<i>": [h]}`` max |activation| of each hidden unit over every
            non-padding token of the probe (when asked).
        layer_names: the captured modules' names.
    """

    states: dict[str, torch.Tensor]
    keys: torch.Tensor
    n_tokens: int
    unit_max: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_names: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Selected tokens."""
        return int(self.keys.numel())


class _ChunkTokens:
    """The current chunk's token mask and the candidate positions for the bottom-k buffer."""

    def __init__(self, batch: Any, seed: int, threshold: float, want_next: bool, want_label: bool = False) -> None:
        self.batch, self.seed, self.threshold, self.want_next = batch, seed, threshold, want_next
        self.want_label = want_label
        self.label: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keys: torch.Tensor | None = None
        self.next: torch.Tensor | None = None

    def prepare(self, shape: torch.Size) -> None:
        """Fix mask and candidates from the first activation's ``[B, T]``."""
        if self.mask is not None:
            return
        b, t = int(shape[0]), int(shape[1])
        mask = batch_mask(self.batch)
        if mask is None or tuple(mask.shape) != (b, t):
            mask = torch.ones(b, t, dtype=torch.bool)
        mask = mask.cpu()
        self.mask = mask
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        keys = token_keys(sample_hashes(self.batch, mask), positions, self.seed)
        chosen = mask & (keys < self.threshold)
        self.index = tuple(chosen.nonzero(as_tuple=True))  # type: ignore[assignment]
        self.keys = keys[self.index]
        if self.want_next:
            nxt = next_token_ids(self.batch, mask)
            self.next = None if nxt is None else nxt.cpu()[self.index]
        labels = class_labels(self.batch, b) if self.want_label else None
        self.label = None if labels is None else labels.cpu()[self.index[0]]


def capture_tokens(
    model: torch.nn.Module,
    chunks: Sequence[Any],
    layers: Sequence[Layer],
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    *,
    max_tokens: int,
    seed: int,
    collective: Collective | None = None,
    with_input: bool = False,
    with_next: bool = False,
    with_units: bool = False,
    on_output: Callable[[Any, torch.Tensor, torch.Tensor], None] | None = None,
    check_time: Callable[..., None] | None = None,
    with_label: bool = False,
) -> TokenStates:
    """Run the probe and keep the selected tokens' states (see the module docstring).

    Args:
        model: the model (eval mode, weights as they should be measured).
        chunks: this rank's probe chunks.
        layers: from :func:`resolve_layers`.
        loss_fn: drives the forward of non-HF batches (:func:`run_forward`).
        max_tokens: at most this many tokens are kept (over all ranks).
        seed: the sampling seed.
        collective: sums across ranks (gathers are sums into zero-filled buffers).
        with_input: also keep the first layer's input (stream ``"input"``).
        with_next: also keep the next-token ids (stream ``"next"``; batches with ``input_ids``).
        with_units: also track each hidden unit's max |activation| over all tokens.
        on_output: ``on_output(batch, logits, mask [B, T])`` after each full forward; when
            ``None``, each forward stops after the last layer.
        check_time: called after each chunk (the metric's deadline).
        with_label: also keep each token's sample class label (stream ``"label"``;
            batches whose ``labels`` are ``[B]`` integers: a classification head).

    Returns:
        :class:`TokenStates` (states in float64 for a float64 model, else float32).

    Raises:
        ValueError: no non-padding token in the probe, or an activation of an unexpected shape.
    """
    collective = collective or LocalCollective()
    buffers: dict[str, torch.Tensor] = {}
    buf_keys = torch.zeros(0, dtype=torch.float64)
    unit_max: dict[str, torch.Tensor] = {}
    n_tokens = 0
    current: dict[str, Any] = {}
    fired: set[int] = set()
    handles = []
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32

    def keep(stream: str, tensor: torch.Tensor, where: str) -> None:
        chunk: _ChunkTokens = current["chunk"]
        tensor = _as_tokens(tensor.detach(), where)
        chunk.prepare(tensor.shape)
        current[stream] = tensor[chunk.index[0].to(tensor.device), chunk.index[1].to(tensor.device)].to(dtype).cpu()

    def output_hook(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor_of(output)
            if tensor is None:
                raise ValueError(f"activation capture: {layers[i].name} returned no tensor")
            keep(f"layers/{i}", tensor, layers[i].name)
            if with_units and layers[i].own_units:
                _track_max(f"layers/{i}", _as_tokens(tensor.detach(), layers[i].name))
            fired.add(i)
            if on_output is None and len(fired) == len(layers):
                raise _StopForward

        return hook

    def _track_max(stream: str, acts: torch.Tensor) -> None:
        chunk: _ChunkTokens = current["chunk"]
        chunk.prepare(acts.shape)
        mask = chunk.mask.to(acts.device)
        local = acts.abs().masked_fill(~mask.unsqueeze(-1), 0).amax(dim=(0, 1)).to(torch.float64).cpu()
        unit_max[stream] = local if stream not in unit_max else torch.maximum(unit_max[stream], local)

    def units_hook(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            _track_max(f"layers/{i}", _as_tokens(args[0].detach(), f"{layers[i].name} MLP"))

        return hook

    def input_hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        tensor = args[0] if args else kwargs.get("hidden_states")
        if isinstance(tensor, torch.Tensor):
            keep("input", tensor, f"{layers[0].name} input")

    def model_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        current["output"] = output

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.module.register_forward_hook(output_hook(i)))
            if with_units and layer.units is not None:
                handles.append(layer.units.register_forward_pre_hook(units_hook(i)))
        if with_input:
            handles.append(layers[0].module.register_forward_pre_hook(input_hook, with_kwargs=True))
        if on_output is not None:
            handles.append(model.register_forward_hook(model_hook))
        with torch.no_grad():
            for done, batch in enumerate(chunks):
                threshold = float(buf_keys[-1]) if buf_keys.numel() >= max_tokens else 2.0
                current.clear()
                fired.clear()
                current["chunk"] = chunk = _ChunkTokens(batch, seed, threshold, with_next, with_label)
                try:
                    run_forward(model, batch, loss_fn)
                except _StopForward:
                    pass
                if chunk.mask is None:
                    raise ValueError("activation capture: no captured layer ran in the forward pass")
                n_tokens += int(chunk.mask.sum())
                if on_output is not None:
                    logits = model_logits(current.get("output"))
                    if logits is not None:
                        on_output(batch, logits, chunk.mask)
                streams = {k: v for k, v in current.items() if k.startswith("layers/") or k == "input"}
                if with_next and chunk.next is not None:
                    streams["next"] = chunk.next
                if chunk.label is not None:
                    streams["label"] = chunk.label
                buf_keys, buffers = _merge(buf_keys, buffers, chunk.keys, streams, max_tokens)
                if check_time is not None:
                    check_time(chunks_done=done + 1)
    finally:
        for handle in handles:
            handle.remove()
    n_tokens = int(collective.sum_scalar(float(n_tokens)))
    if n_tokens == 0:
        raise ValueError("activation capture: the probe has no non-padding tokens (attention_mask is all 0)")
    if collective.world_size > 1:
        buf_keys, buffers = _gather(buf_keys, buffers, collective, max_tokens)
        unit_max = _gather_max(unit_max, collective)
    return TokenStates(buffers, buf_keys, n_tokens, unit_max, [layer.name for layer in layers])


def _merge(
    keys: torch.Tensor, buffers: dict[str, torch.Tensor], new_keys: torch.Tensor, new: dict[str, torch.Tensor], k: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bottom-k of the union (ascending keys)."""
    all_keys = torch.cat([keys, new_keys])
    order = torch.argsort(all_keys, stable=True)[:k]
    merged = {}
    for name, values in new.items():
        old = buffers.get(name)
        both = values if old is None else torch.cat([old, values])
        merged[name] = both[order]
    return all_keys[order], merged


def _gather(
    keys: torch.Tensor, buffers: dict[str, torch.Tensor], collective: Collective, k: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every rank's bottom-k into one (sums into zero-filled ``[world, k, ...]`` buffers)."""
    world, rank = collective.world_size, collective.rank
    counts = torch.zeros(world, dtype=torch.float64)
    counts[rank] = keys.numel()
    collective.sum_([counts])
    all_keys = torch.zeros(world, k, dtype=torch.float64)
    all_keys[rank, : keys.numel()] = keys
    collective.sum_([all_keys])
    valid = torch.arange(k).unsqueeze(0) < counts.long().unsqueeze(1)
    flat_keys = all_keys[valid]
    order = torch.argsort(flat_keys, stable=True)[:k]
    out = {}
    for name in sorted(buffers):
        values = buffers[name]
        full = torch.zeros((world, k, *values.shape[1:]), dtype=torch.float64 if not values.is_floating_point() else values.dtype)
        full[rank, : values.shape[0]] = values.to(full.dtype)
        collective.sum_([full])
        out[name] = full[valid][order].to(values.dtype)
    return flat_keys[order], out


def _gather_max(unit_max: dict[str, torch.Tensor], collective: Collective) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(unit_max):
        full = torch.zeros(collective.world_size, unit_max[name].numel(), dtype=torch.float64)
        full[collective.rank] = unit_max[name]
        collective.sum_([full])
        out[name] = full.amax(0)
    return out


def state_bytes_estimate(n_params: int, max_tokens: int, copies: float, itemsize: int = 4) -> int:
    """Bytes of ``copies`` sets of captured token states, ``max_tokens x sum_l d_l``.

    The planner knows the parameter count n but not the widths; for transformers
    n ~ 12 L d^2 with L ~ d / 64 gives sum_l d_l = L d ~ sqrt(n) (GPT-2 small: 9.2k vs
    sqrt(n) = 11k; Qwen2-0.5B: 21.5k vs 22k; Llama-7B: 131k vs 82k), so 2 sqrt(n) bounds it.
    """
    return int(copies * max_tokens * 2.0 * float(max(n_params, 1)) ** 0.5 * itemsize)
