"""Figures of ``sharpness``, from results only: the probe loss along each direction, with its local quadratic.

One panel per measured direction: f(t) = L(theta + t d) at the points the scheme evaluated,
and the quadratic f(0) + slope t + curvature t^2 / 2 from the logged derivatives (they agree
where the finite differences are trustworthy). ``<d>/losses`` has seven slots, t = -4h, -2h,
-h, 0, h, 2h, 4h (:data:`~uma_callbacks.metrics.sharpness.GRID`), NaN where f was not
evaluated: the default ``"two_sided"`` scheme fills t = -h, 0, h, 2h, ``"one_sided"``
t = 0, h, 2h, 4h, and ``"central"`` all seven; a NaN slot is not drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uma_callbacks.metrics.base import MetricResult
from uma_callbacks.plots.core import _pyplot, register_drawer, save_figure


@register_drawer("sharpness")
def _sharpness(result: MetricResult, folder: Path) -> list[Path]:
    steps = np.asarray(result.arrays.get("steps", []), dtype=float).reshape(-1)
    names = [k[: -len("/losses")] for k in result.arrays if k.endswith("/losses")]
    if not steps.size or not names:
        return []
    ts = np.concatenate([-steps[::-1], [0.0], steps])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        losses = np.asarray(result.arrays[f"{name}/losses"], dtype=float).reshape(-1)
        if losses.size != ts.size:
            continue
        ax.plot(ts, losses, "o", label="probe loss")
        curvature = result.scalars.get(f"{name}/curvature")
        slope = result.scalars.get(f"{name}/slope")
        if curvature is not None and slope is not None:
            seen = ts[np.isfinite(losses)]  # the quadratic over the points evaluated, not beyond them
            fine = np.linspace(seen.min(), seen.max(), 101) if seen.size else ts
            f0 = losses[ts.size // 2]
            error = result.scalars.get(f"{name}/curvature_error")
            spread = f" ± {error:.2g}" if error is not None and np.isfinite(error) else ""
            ax.plot(fine, f0 + slope * fine + 0.5 * curvature * fine**2, "r--", lw=1,
                    label=f"f(0) + slope t + f'' t²/2: f'' = {curvature:.4g}{spread}, slope {slope:.4g}")  # fmt: skip
        ax.set_xlabel(f"t along the unit {name} direction")
        ax.set_ylabel("probe loss")
        ax.set_title(f"sharpness along the {name}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "sharpness.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return [path]
