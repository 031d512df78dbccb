"""Issue 17 item 7: a ``pytorch_model.bin`` goes through PyTorch's restricted unpickler only.

``load_weights`` reads legacy ``.bin`` files with ``torch.load(weights_only=True)``, which
refuses any global outside its allow-list; a payload that would run a command is a
``ValueError`` naming the file, and the command never runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from uma_callbacks.checkpoints import load_weights


class Evil:
    """Unpickling this would call ``os.system``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_legacy_pickle_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    marker = tmp_path / "pwned-raw"
    # protocol-0 opcodes by hand: GLOBAL os.system, the argument, REDUCE
    (folder / "pytorch_model.bin").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_weights(folder)
    assert not marker.exists()


def test_a_malicious_torch_save_archive_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "zip"
    folder.mkdir()
    marker = tmp_path / "pwned-zip"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_weights(folder)
    assert not marker.exists()


def test_plain_tensors_in_a_legacy_file_load(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(load_weights(tmp_path)["w"], torch.arange(3.0))


def test_the_docstring_says_what_the_unpickler_accepts():
    import uma_callbacks.checkpoints as checkpoints

    doc = checkpoints.__doc__
    assert "nothing is\never unpickled" not in doc and "restricted" in doc and "UnpicklingError" in doc
