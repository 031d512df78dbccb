"""Checkpoints on disk: discovery, weights loading (safetensors only), model building.

Three layouts are recognised, and every checkpoint gets its own global step:

- **Trainer**: ``<run>/checkpoint-<N>/`` folders; the step is ``global_step`` from the
  folder's ``trainer_state.json``. A folder without ``trainer_state.json``, or with the
  ``checkpoint-is-incomplete.txt`` sentinel, is still being written (or was cut off) and
  is skipped.
- **Accelerate** ``save_state`` folders: the step is read from ``uma_state.json``
  (``{"step": N}``, written by the Accelerate hook), or from a user mapping
  ``{folder name or path: step}``.
- **Plain HF model folders** (``config.json`` + weights): given as an explicit list; the
  step is the mapping's, else the ``-<N>`` suffix of the name, else the list position.

:func:`discover_with_problems` also returns what it could not use as ``(path, reason)``
pairs -- a ``trainer_state.json`` or ``uma_state.json`` that is not JSON or has no valid
step, a symlink loop, a link that leads nowhere -- so a backfill can report each as an
error record; :func:`discover_checkpoints` keeps its older contract (problems logged,
two folders on one step refused). Two folders claiming one step are both returned by
:func:`discover_with_problems`, told apart by their path.

Weights are read with ``safetensors`` (single file or a sharded ``*.safetensors.index.json``,
whose shard names must be plain file names inside the checkpoint folder: an index that
points elsewhere is refused). A legacy ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``: that is PyTorch's *restricted* unpickler, not no
unpickling. It accepts only tensors and storages, the primitive containers (``dict``,
``OrderedDict``, ``list``, ``tuple``, ``set``), numbers, strings, bytes, ``None`` and the
few torch types on its allow-list (``torch.Size``, dtypes, devices, ...); a file naming
any other global (``os.system``, ``builtins.eval``, a user class) makes ``torch.load``
raise ``UnpicklingError`` before anything is called, and :func:`load_weights` turns that
into a ``ValueError`` naming the file. Accelerate's FSDP ``FULL_STATE_DICT`` file
``pytorch_model_fsdp.bin`` is read the same way.

Sharded checkpoints (FSDP with ``SHARDED_STATE_DICT``: Accelerate's ``save_state`` and the
Trainer write ``<checkpoint>/pytorch_model_fsdp_0/``, a ``torch.distributed.checkpoint``
folder) are gathered into full tensors by :mod:`uma_callbacks.core.dcp`, whose ``.metadata``
pickle is read with an allow-list of DCP's metadata types only; ``optimizer_0/`` is ignored.
:func:`read_weights` checks the gathered size against a memory budget first.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uma_callbacks.core.dcp import ACCELERATE_MODEL_FOLDER, find_dcp_model_folder, load_dcp
from uma_callbacks.core.file_names import is_plain_file_name
from uma_callbacks.core.safe_json import read_json
from uma_callbacks.engine.state_file import STATE_FILE

logger = logging.getLogger(__name__)

#: The Trainer's marker of a checkpoint folder still being written.
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"
#: Our own step file in Accelerate ``save_state`` folders (named where it is written).
UMA_STATE = STATE_FILE
#: Layouts :func:`discover_checkpoints` reports.
KINDS = ("trainer", "accelerate", "model")

_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder and its global step.

    Attributes:
        path: the folder.
        step: the global step it was saved at (the x-axis of every record).
        kind: one of :data:`KINDS`.
    """

    path: Path
    step: int
    kind: str

    @property
    def name(self) -> str:
        """The folder's name (``checkpoint-300``)."""
        return self.path.name

    @property
    def name_rank(self) -> int:
        """How well the folder's name agrees with its step, best first: 0, 1 or 2.

        0 for the Trainer's own name ``checkpoint-<step>``, 1 for a name ending in the step's
        number (``checkpoint-0300``, ``run_300``), 2 otherwise. Of two folders claiming one
        step, the one whose name agrees measures it.
        """
        if self.name == f"checkpoint-{self.step}":
            return 0
        match = _TRAILING_NUMBER.search(self.name)
        return 1 if match is not None and int(match.group(1)) == self.step else 2


class _Problem(Exception):
    """A folder that looks like a checkpoint but cannot be used (the reason is the message)."""


def _read_step(path: Path, field: str) -> int:
    """``int(json[field])`` of a state file.

    Raises:
        _Problem: the file is not readable JSON or holds no integer ``field`` (naming the file and what is wrong).
    """
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:  # UnreadableJSON: too deep, too long, not UTF-8, not JSON
        raise _Problem(f"{path.name} is not readable JSON ({type(err).__name__}: {err})") from err
    value = data.get(field) if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise _Problem(f"{path.name} has no integer {field!r} (got {value!r:.60})")
    return value


def _trainer_step(folder: Path) -> int | None:
    if (folder / INCOMPLETE_SENTINEL).exists():
        return None
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    return _read_step(state, "global_step")


def _uma_step(folder: Path) -> int | None:
    path = folder / UMA_STATE
    if not path.is_file():
        return None
    return _read_step(path, "step")


def _mapped_step(folder: Path, steps: Mapping[str, int] | None) -> int | None:
    if not steps:
        return None
    for key in (str(folder), folder.name, str(folder.resolve())):
        if key in steps:
            return int(steps[key])
    return None


def discover_with_problems(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    steps: Mapping[str, int] | None = None,
) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """The checkpoints of a run folder (or list of folders), and what could not be used.

    Args:
        source: a run folder (holding ``checkpoint-*/`` or Accelerate state folders, or
            itself one model folder), or a list of checkpoint / model folders.
        steps: optional ``{folder name or path: step}`` overriding what is on disk.

    Returns:
        ``(checkpoints, problems)``: complete checkpoints sorted by ``(step, path)`` --
        two folders claiming one step are both there, told apart by ``path`` -- and
        ``(path, reason)`` for each folder that looks like a checkpoint but cannot be
        used (a state file that is not JSON or has no step, a symlink loop, a dangling
        link). Incomplete Trainer folders (still being written) are neither.

    Raises:
        FileNotFoundError: ``source`` (or a listed folder) does not exist.
        ValueError: neither a checkpoint nor a problem was found.
    """
    problems: list[tuple[Path, str]] = []
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"run folder {root} does not exist (or is not a folder)")
        found = _scan_run_folder(root, steps, problems)
        if not found and not problems:
            raise ValueError(
                f"no checkpoints in {root}: expected checkpoint-<N>/ folders with trainer_state.json, "
                f"Accelerate save_state folders with {UMA_STATE}, or model folders with config.json"
            )
    else:
        found = []
        for position, item in enumerate(source):
            folder = Path(item)
            reason = _link_problem(folder)
            if reason is not None:
                problems.append((folder, reason))
                continue
            if not folder.is_dir():
                raise FileNotFoundError(f"checkpoint folder {folder} does not exist (or is not a folder)")
            try:
                found.append(_classify(folder, steps, position))
            except _Problem as err:
                problems.append((folder, str(err)))
        if not found and not problems:
            raise ValueError("checkpoints: the list of checkpoint folders is empty")
    found.sort(key=lambda c: (c.step, str(c.path)))
    return found, problems


def discover_checkpoints(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    steps: Mapping[str, int] | None = None,
) -> list[Checkpoint]:
    """The checkpoints of a run folder (or an explicit list of folders), ordered by step.

    :func:`discover_with_problems` with the older contract: the problems are logged as
    warnings and left out, and two checkpoints on one step are refused.

    Args:
        source: a run folder or a list of checkpoint / model folders.
        steps: optional ``{folder name or path: step}`` overriding what is on disk.

    Returns:
        Complete checkpoints sorted by step (incomplete Trainer folders left out).

    Raises:
        FileNotFoundError: ``source`` (or a listed folder) does not exist.
        ValueError: no checkpoint was found, or two checkpoints claim the same step.
    """  # noqa: DOC502 (FileNotFoundError: from discover_with_problems)
    found, problems = discover_with_problems(source, steps)
    for path, reason in problems:
        logger.warning("uma: checkpoint %s skipped: %s", path, reason)
    if not found:
        raise ValueError(f"no usable checkpoints in {source}: " + "; ".join(f"{p}: {r}" for p, r in problems))
    seen: dict[int, Checkpoint] = {}
    for ckpt in found:
        if ckpt.step in seen:
            raise ValueError(
                f"checkpoints {seen[ckpt.step].path} and {ckpt.path} both claim step {ckpt.step}; "
                "pass steps={folder: step} to tell them apart"
            )
        seen[ckpt.step] = ckpt
    return found


def _link_problem(path: Path) -> str | None:
    """Why a symlinked entry cannot be followed (a loop, a dangling link), else None."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "symlink loop"
    except OSError as err:
        if getattr(err, "errno", None) == 40:  # ELOOP
            return "symlink loop"
        return f"symlink leads nowhere ({os.readlink(path)})"
    return None


def _scan_run_folder(root: Path, steps: Mapping[str, int] | None, problems: list[tuple[Path, str]]) -> list[Checkpoint]:
    found = []
    for child in sorted(root.iterdir()):
        reason = _link_problem(child)
        if reason is not None:
            if child.name.startswith("checkpoint-") or reason == "symlink loop":
                problems.append((child, reason))
            continue
        if not child.is_dir():
            continue
        try:
            ckpt = _scan_child(child, steps)
        except _Problem as err:
            problems.append((child, str(err)))
            continue
        if ckpt is not None:
            found.append(ckpt)
    if not found and not problems and (root / "config.json").is_file():
        try:
            found.append(_classify(root, steps, 0))
        except _Problem as err:
            problems.append((root, str(err)))
    return found


def _scan_child(child: Path, steps: Mapping[str, int] | None) -> Checkpoint | None:
    mapped = _mapped_step(child, steps)
    if child.name.startswith("checkpoint-") and _TRAILING_NUMBER.search(child.name):
        step = mapped if mapped is not None else _trainer_step(child)
        kind = "trainer"
        if step is None and not (child / INCOMPLETE_SENTINEL).exists():
            step, kind = _uma_step(child), "accelerate"  # accelerate save_state into checkpoint-<N>/
        return Checkpoint(child, step, kind) if step is not None else None
    step = mapped if mapped is not None else _uma_step(child)
    return Checkpoint(child, step, "accelerate") if step is not None else None


def _classify(folder: Path, steps: Mapping[str, int] | None, position: int) -> Checkpoint:
    mapped = _mapped_step(folder, steps)
    if mapped is not None:
        return Checkpoint(folder, mapped, "model")
    for reader, kind in ((_trainer_step, "trainer"), (_uma_step, "accelerate")):
        step = reader(folder)
        if step is not None:
            return Checkpoint(folder, step, kind)
    match = _TRAILING_NUMBER.search(folder.name)
    return Checkpoint(folder, int(match.group(1)) if match else position, "model")


# ---------------------------------------------------------------------- weights
def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint folder (safetensors preferred, shards resolved).

    Raises:
        FileNotFoundError: no weights in the folder.
        ValueError: a sharded index that is not JSON, or names a shard outside the folder.
    """  # noqa: DOC502 (ValueError: from _shard_names)
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / s for s in _shard_names(index)]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    sharded = find_dcp_model_folder(folder)
    if sharded is not None:
        return [sharded]  # a DCP folder: .metadata + *.distcp
    for legacy in (folder / "pytorch_model.bin", folder / "pytorch_model_fsdp.bin"):
        if legacy.is_file():
            return [legacy]
    raise FileNotFoundError(
        f"no model weights (model.safetensors, shards, a {ACCELERATE_MODEL_FOLDER}/ sharded checkpoint "
        f"or pytorch_model.bin) in {folder}"
    )


def _shard_names(index: Path) -> list[str]:
    r"""The shard file names of a ``*.safetensors.index.json``: plain names in its own folder only.

    Raises:
        ValueError: not JSON, no ``weight_map`` object, or a shard name that is not a plain
            file name (``/``, ``\``, ``..``, absolute): it would read another folder's weights.
    """
    try:
        weight_map = read_json(index)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"sharded index {index} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"sharded index {index}: 'weight_map' must be an object of shard file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not is_plain_file_name(name):
            raise ValueError(
                f"sharded index {index} names the shard {name!r} outside its checkpoint folder; refused"
            )
    return names


def load_weights(folder: str | os.PathLike[str], max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` on CPU from a checkpoint folder, never unpickling.

    Args:
        folder: the checkpoint folder.
        max_bytes: the most bytes a sharded (DCP) checkpoint may take once gathered.

    Raises:
        FileNotFoundError: no weights in the folder.
        ValueError: a weight file is damaged (the reason from safetensors is kept).
        GatherExceedsBudget: a sharded checkpoint would exceed ``max_bytes`` once gathered.
    """  # noqa: DOC502 (all three: from read_weights)
    return read_weights(folder, max_bytes)[0]


def read_weights(folder: str | os.PathLike[str], max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`load_weights`, and what the loading did.

    What it did is ``{}``, or for a sharded checkpoint ``{"format": "dcp", "shards": N,
    "gathered_bytes": B, ...}`` (see :func:`~uma_callbacks.core.dcp.load_dcp`).

    Raises:
        FileNotFoundError: no weights in the folder.
        ValueError: a weight file is damaged, or refused.
        GatherExceedsBudget: a sharded checkpoint would exceed ``max_bytes`` once gathered.
    """  # noqa: DOC502 (GatherExceedsBudget: from load_dcp)
    from safetensors.torch import load_file

    files = weight_files(folder)
    if len(files) == 1 and files[0].is_dir():
        return load_dcp(files[0], max_bytes)
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".bin":
                weights.update(torch.load(path, map_location="cpu", weights_only=True))
            else:
                weights.update(load_file(str(path)))
        except FileNotFoundError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"cannot read weights {path}: {type(err).__name__}: {err}") from err
    return weights, {}


def unwrap(model: Any) -> Any:
    """The user's model inside its wrappers: DDP / DeepSpeed ``.module``, ``torch.compile``'s ``_orig_mod``."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if inner is None and not hasattr(model, "config"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def ensure_config_json(folder: str | os.PathLike[str], model: Any) -> bool:
    """Write the model's config as ``<folder>/config.json`` when the folder exists and has none.

    A sharded save (FSDP ``SHARDED_STATE_DICT``, Accelerate's ``save_state``) writes the
    weights but no config; the backfill rebuilds the model from it (``uma backfill RUN``
    with no model factory). Its ``architectures`` names the model's own class, unwrapped
    (as ``save_pretrained`` writes it): a ``BertForSequenceClassification`` loaded from a
    base checkpoint keeps ``["BertModel"]`` in its config, and the backfill would build the
    bare encoder. The model's own config is left as it is. Returns whether a file was written.
    """
    model = unwrap(model)
    config = getattr(model, "config", None)
    path = os.path.join(os.fspath(folder), "config.json")
    if not (hasattr(config, "to_json_file") and os.path.isdir(folder)) or os.path.exists(path):
        return False
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.to_json_file(path)
    return True


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: it is not valid JSON.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        hint = (
            " (the Trainer writes none beside a sharded FSDP checkpoint: copy the model's config.json into it)"
            if find_dcp_model_folder(folder) is not None
            else ""
        )
        raise FileNotFoundError(f"no config.json in {folder}: cannot tell which model to build{hint}")
    try:
        config = read_json(path)
    except ValueError as err:
        raise ValueError(f"config.json in {folder} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"config.json in {folder} must be a JSON object; got {type(config).__name__}")
    return config


def architecture_of(config: Mapping[str, Any]) -> str:
    """``"<model_type>/<first architecture>"``: what must match across one run's checkpoints."""
    archs = config.get("architectures") or ["?"]
    return f"{config.get('model_type', '?')}/{archs[0]}"


def build_model(folder: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """An untrained model of the checkpoint's architecture, built from its ``config.json``.

    The class is ``config.architectures[0]`` from transformers when it exists, else
    ``AutoModelForCausalLM`` (then ``AutoModel``). Nothing is downloaded.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: transformers cannot build the architecture.
    """  # noqa: DOC502 (FileNotFoundError: from read_config)
    import transformers

    config = dict(config) if config is not None else read_config(folder)
    hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    try:
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(hf_config)
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_config(hf_config)
            except ValueError:
                model = transformers.AutoModel.from_config(hf_config)
    except Exception as err:
        raise ValueError(f"cannot build a model from {Path(folder) / 'config.json'}: {err}") from err
    return model.eval()


def load_into(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into ``model`` (dtype cast to the model's), checking coverage.

    Weights tied to a loaded one (``lm_head`` tied to the embeddings) may be absent.

    Raises:
        ValueError: a weight has the wrong shape, is unknown to the model, or is missing.
    """
    state = model.state_dict()
    unexpected = sorted(set(weights) - set(state))
    if unexpected:
        raise ValueError(f"checkpoint holds weights the model does not have: {unexpected[:5]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(
                f"weight {name} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(state[name].shape)} "
                "in the model: another architecture?"
            )
    loaded_ptrs = {state[n].data_ptr() for n in weights}
    missing = sorted(n for n in set(state) - set(weights) if state[n].data_ptr() not in loaded_ptrs)
    if missing:
        raise ValueError(f"checkpoint lacks weights the model needs: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor)


