"""Figures drawn from results only (never from a model): PNG files next to the journal.

matplotlib is imported only inside this package (the ``[plots]`` extra), with the Agg
backend. Each metric family registers its drawer (:func:`register_drawer`) in its own
module here; :func:`draw_result` dispatches on the result's metric name, and draws a
metric with no drawer (one registered from outside the package) as a bar chart of its
scalars (:func:`draw_scalars`).
"""

from uma_callbacks.plots.core import (
    DRAWERS,
    TREND_DRAWERS,
    draw_result,
    draw_scalars,
    draw_trends,
    drawer_for,
    heatmap,
    register_drawer,
    register_trend,
    render_result,
    save_figure,
)

# The figure modules register their drawers on import, in this order: it is the order of the
# trend figures (TREND_DRAWERS), so the imports keep it rather than the alphabetical one.
# isort: off
from uma_callbacks.plots import attention as _attention  # noqa: F401 (registers its figures)
from uma_callbacks.plots import weight_space as _weight_space  # noqa: F401 (registers its figures)
from uma_callbacks.plots import representations as _representations  # noqa: F401 (registers its figures)
from uma_callbacks.plots import spectra as _spectra  # noqa: F401 (registers its figures)
from uma_callbacks.plots import sharpness as _sharpness  # noqa: F401 (registers its figures)
from uma_callbacks.plots import hessian_blocks as _hessian_blocks  # noqa: F401 (registers its figures)
from uma_callbacks.plots import density as _density  # noqa: F401 (registers its figures)
from uma_callbacks.plots import influence as _influence  # noqa: F401 (registers its figures)
from uma_callbacks.plots import optimizer_state as _optimizer_state  # noqa: F401 (registers its figures)
# isort: on

__all__ = [
    "DRAWERS",
    "TREND_DRAWERS",
    "draw_result",
    "draw_scalars",
    "draw_trends",
    "drawer_for",
    "heatmap",
    "register_drawer",
    "register_trend",
    "render_result",
    "save_figure",
]
