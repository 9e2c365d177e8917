"""A fitted mixture of experts as one HTML page that opens offline.

:func:`html_report` draws what a reader should see rather than read: the data with
each expert's fit, where the gate hands the input space to each expert, how well
the predictive intervals cover held-out rows, how EM climbed, the criterion against
K when K was chosen, the coefficients with their standard errors, how much data
each expert handles, and the model written as a formula. Figures are PNGs embedded
as data URIs, so the file needs nothing else.
"""

from moekit.report.mdn import mdn_sections
from moekit.report.regression import LEVELS, WIDTH_ROWS
from moekit.report.sections import MAX_TABLE_PARAMETERS, PLOT_ROWS, html_report, report_sections
from moekit.report.tour import TOUR_CHAPTERS, TOUR_INTRO, TOUR_TEXT, tour_page, tour_report

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
