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

Weights are read with ``safetensors`` (single file or a sharded ``*.safetensors.index.json``).
A ``pytorch_model.bin`` is read only with ``torch.load(weights_only=True)``; nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


#: The Trainer's marker of a checkpoint folder still being written.
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"
#: Our own step file in Accelerate ``save_state`` folders.
UMA_STATE = "uma_state.json"
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


def _trainer_step(folder: Path) -> int | None:
    if (folder / INCOMPLETE_SENTINEL).exists():
        return None
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError):
        return None


def _uma_step(folder: Path) -> int | None:
    path = folder / UMA_STATE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _mapped_step(folder: Path, steps: Mapping[str, int] | None) -> int | None:
    if not steps:
        return None
    for key in (str(folder), folder.name, str(folder.resolve())):
        if key in steps:
            return int(steps[key])
    return None


def discover_checkpoints(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    steps: Mapping[str, int] | None = None,
) -> list[Checkpoint]:
    """The checkpoints of a run folder (or an explicit list of folders), ordered by step.

    Args:
        source: a run folder (holding ``checkpoint-*/`` or Accelerate state folders, or
            itself one model folder), or a list of checkpoint / model folders.
        steps: optional ``{folder name or path: step}`` overriding what is on disk.

    Returns:
        Complete checkpoints sorted by step (incomplete Trainer folders left out).

    Raises:
        FileNotFoundError: ``source`` (or a listed folder) does not exist.
        ValueError: no checkpoint was found, or two checkpoints claim the same step.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"run folder {root} does not exist (or is not a folder)")
        found = _scan_run_folder(root, steps)
        if not found:
            raise ValueError(
                f"no checkpoints in {root}: expected checkpoint-<N>/ folders with trainer_state.json, "
                f"Accelerate save_state folders with {UMA_STATE}, or model folders with config.json"
            )
    else:
        found = []
        for position, item in enumerate(source):
            folder = Path(item)
            if not folder.is_dir():
                raise FileNotFoundError(f"checkpoint folder {folder} does not exist (or is not a folder)")
            found.append(_classify(folder, steps, position))
        if not found:
            raise ValueError("checkpoints: the list of checkpoint folders is empty")
    found.sort(key=lambda c: (c.step, c.name))
    seen: dict[int, Checkpoint] = {}
    for ckpt in found:
        if ckpt.step in seen:
            raise ValueError(
                f"checkpoints {seen[ckpt.step].path} and {ckpt.path} both claim step {ckpt.step}; "
                "pass steps={folder: step} to tell them apart"
            )
        seen[ckpt.step] = ckpt
    return found


def _scan_run_folder(root: Path, steps: Mapping[str, int] | None) -> list[Checkpoint]:
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        mapped = _mapped_step(child, steps)
        if child.name.startswith("checkpoint-") and _TRAILING_NUMBER.search(child.name):
            step = mapped if mapped is not None else _trainer_step(child)
            kind = "trainer"
            if step is None and not (child / INCOMPLETE_SENTINEL).exists():
                step, kind = _uma_step(child), "accelerate"  # accelerate save_state into checkpoint-<N>/
            if step is not None:
                found.append(Checkpoint(child, step, kind))
            continue
        step = mapped if mapped is not None else _uma_step(child)
        if step is not None:
            found.append(Checkpoint(child, step, "accelerate"))
    if not found and (root / "config.json").is_file():
        found.append(_classify(root, steps, 0))
    return found


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
    """
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return [legacy]
    raise FileNotFoundError(f"no model weights (model.safetensors, shards or pytorch_model.bin) in {folder}")


def load_weights(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` on CPU from a checkpoint folder, never unpickling.

    Raises:
        FileNotFoundError: no weights in the folder.
        ValueError: a weight file is damaged (the reason from safetensors is kept).
    """
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            if path.suffix == ".bin":
                weights.update(torch.load(path, map_location="cpu", weights_only=True))
            else:
                weights.update(load_file(str(path)))
        except FileNotFoundError:
            raise
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"cannot read weights {path}: {type(err).__name__}: {err}") from err
    return weights


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: it is not valid JSON.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: cannot tell which model to build")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"config.json in {folder} is not valid JSON: {err}") from err


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
    """
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


