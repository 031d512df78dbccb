"""Global random state left as found: what every entry point that a training run calls into uses."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore Python's ``random``, NumPy's and torch's (CPU and initialised CUDA) global RNGs on exit.

    CUDA states are saved only where CUDA is already initialised (saving them would initialise it).

    Example:
        >>> import torch
        >>> before = torch.get_rng_state()
        >>> with rng_preserved():
        ...     _ = torch.rand(3), random.random()
        >>> torch.equal(before, torch.get_rng_state())
        True
    """
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
