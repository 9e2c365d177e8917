"""A fitted mixture of experts as one HTML page that opens offline.

:func:`html_report` draws what a reader should see rather than read: the data with
each expert's fit, where the gate hands the input space to each expert, how well
the predictive intervals cover held-out rows, how EM climbed, the criterion against
K when K was chosen, the coefficients with their standard errors, how much data
each expert handles, and the model written as a formula. Figures are PNGs embedded
as data URIs, so the file needs nothing else.

The names are imported on first use (PEP 562): the text of a report
(:mod:`moekit.report.describe`, :mod:`moekit.report.headline`) does not load the
page's figures and matplotlib.
"""

from typing import TYPE_CHECKING

from moekit import _lazy_names

_PUBLIC = {
    "LEVELS": "moekit.report.regression",
    "MAX_TABLE_PARAMETERS": "moekit.report.sections",
    "PLOT_ROWS": "moekit.report.sections",
    "TOUR_CHAPTERS": "moekit.report.tour",
    "TOUR_INTRO": "moekit.report.tour",
    "TOUR_TEXT": "moekit.report.tour",
    "WIDTH_ROWS": "moekit.report.regression",
    "html_report": "moekit.report.sections",
    "mdn_sections": "moekit.report.mdn",
    "report_sections": "moekit.report.sections",
    "tour_page": "moekit.report.tour",
    "tour_report": "moekit.report.tour",
}

__all__ = [
    "LEVELS",
    "MAX_TABLE_PARAMETERS",
    "PLOT_ROWS",
    "TOUR_CHAPTERS",
    "TOUR_INTRO",
    "TOUR_TEXT",
    "WIDTH_ROWS",
    "html_report",
    "mdn_sections",
    "report_sections",
    "tour_page",
    "tour_report",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from moekit.report.mdn import mdn_sections
    from moekit.report.regression import LEVELS, WIDTH_ROWS
    from moekit.report.sections import (
        MAX_TABLE_PARAMETERS,
        PLOT_ROWS,
        html_report,
        report_sections,
    )
    from moekit.report.tour import TOUR_CHAPTERS, TOUR_INTRO, TOUR_TEXT, tour_page, tour_report

__getattr__, __dir__ = _lazy_names(__name__, _PUBLIC)
