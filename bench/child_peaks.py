"""Peak memory measured in a child process, the way every bench here does it.

The parent reruns its own script with ``--memory --threads N`` under :data:`MEMORY_ENV`
(glibc serves and returns every block >= 64 KiB by mmap, so the resident set follows the
live tensors); the child prints ``peak_<name>=<bytes>`` lines, which come back as a dict.
"""

from __future__ import annotations

import os
import subprocess
import sys

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peaks_in_child(script: str, threads: int) -> dict[str, int]:
    """``{name: bytes}`` from the ``peak_<name>=<bytes>`` lines of ``script --memory --threads N``."""
    out = subprocess.run(
        [sys.executable, script, "--memory", "--threads", str(threads)],
        env=dict(os.environ, **MEMORY_ENV), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {
        line.split("=")[0][len("peak_") :]: int(line.split("=")[1])
        for line in out.stdout.splitlines()
        if line.startswith("peak_")
    }
