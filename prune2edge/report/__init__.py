"""The run report: ``RUN_DIR/report.html``, one self-contained page, and its figures as ``RUN_DIR/figures/*.png``.

:func:`load` reads what a run directory holds; one function per figure draws each; :func:`write` draws every
figure it can, renders ``templates/report.html.j2`` and writes the files.

The report reads only what the pipeline wrote. The test split appears only through ``test.npz`` and
``test_scores.npz``, which the evaluation wrote; nothing here loads a dataset. A run that stopped early gets a
report of what exists and a list of what is missing.

Where it is: :mod:`.load` (the run directory, formatting), :mod:`.plot` (what the figures share), :mod:`.members`
and :mod:`.decisions` (one function per figure), :mod:`.page` (the figure list, headline and :func:`write`).
"""

from .decisions import disputed_images, fig_disputed_images
from .load import FORMATS, Run, load, pct
from .members import frontier_axes
from .page import FIGURES, headline, write
from .plot import Figure, Missing

__all__ = [
    "FIGURES",
    "FORMATS",
    "Figure",
    "Missing",
    "Run",
    "disputed_images",
    "fig_disputed_images",
    "frontier_axes",
    "headline",
    "load",
    "pct",
    "write",
]
