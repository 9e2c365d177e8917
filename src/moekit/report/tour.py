"""Several models' sections on one page, and the guided tour of ``moekit demo``."""

from __future__ import annotations

import html

from moekit.report.page import html_page


def tour_report(title: str, intro: str, chapters: list[tuple[str, str, str, list[str]]]) -> str:
    """One page of several chapters: (id, title, introduction HTML, sections)."""
    toc = "".join(f'<li><a href="#{key}">{html.escape(name)}</a></li>'
                  for key, name, _, _ in chapters)  # fmt: skip
    parts = [f"<h1>{html.escape(title)}</h1>", intro, f"<ol>{toc}</ol>"]
    for key, name, text, sections in chapters:
        parts += [f'<h2 id="{key}" class="chapter">{html.escape(name)}</h2>', text, *sections]
    return html_page(title, parts)


TOUR_TITLE = "moekit: a guided tour"
"""The title of ``moekit demo``'s page."""

TOUR_INTRO = (
    "<p>Three problems, three members of the mixture-of-experts family. In each, a "
    "<em>gate</em> g(x) weighs <em>experts</em> p<sub>k</sub>(y | x), and the model is the "
    "mixture p(y | x) = &sum;<sub>k</sub> g<sub>k</sub>(x) p<sub>k</sub>(y | x). Every "
    "figure is drawn from the fitted models; the page needs no network.</p>"
)
"""The introduction of the tour's page (HTML)."""

TOUR_TEXT = {
    "mcycle": (
        "<p>Head acceleration of a crash-test dummy against time after impact: flat, then "
        "a violent swing, then a decay, with noise that changes by regime. One straight line "
        "cannot follow it; a few linear experts under a softmax gate of time can, and each "
        "keeps its own noise level. K is chosen by BIC. <b>Look at</b> the gate weights "
        "under the fit (where each expert takes over), and at the intervals' coverage on "
        "held-out rows.</p>"
    ),
    "digits": (
        "<p>8&times;8 images of handwritten digits, 64 pixel features, 10 classes. Each "
        "expert is a multinomial logistic regression and the gate divides the image space "
        "among them. <b>Look at</b> which expert takes which digits: the gate learns a "
        "division of labour that no one told it.</p>"
    ),
    "bishop": (
        "<p>Bishop's inverse problem: x = t + 0.3 sin(2&pi;t) + noise, and we must recover "
        "t from x. For x between about 0.35 and 0.65 three values of t fit, so the "
        "conditional mean (dashed) is no answer at all. A mixture density network, a neural "
        "network whose outputs are a mixture's weights, means and widths, learns the whole "
        "p(t | x). <b>Look at</b> the density's three branches and its modes (white).</p>"
    ),
}
"""Each chapter's introduction (HTML), by the chapter's id."""

TOUR_CHAPTERS = {
    "mcycle": "1. A regression: the motorcycle crash data",
    "digits": "2. A classifier: handwritten digits",
    "bishop": "3. An inverse problem: a mixture density network",
}
"""The tour's chapters in their order: id -> title."""


def tour_page(sections: dict[str, list[str]]) -> str:
    """The page of ``moekit demo``: each chapter's title, introduction and sections.

    Parameters
    ----------
    sections : dict of str to list of str
        Each chapter's sections (from :func:`~moekit.report.report_sections` or
        :func:`~moekit.report.mdn_sections`), by the chapter's id in
        :data:`TOUR_CHAPTERS`.

    Returns
    -------
    str
        A whole HTML document.
    """
    chapters = [(key, title, TOUR_TEXT[key], sections[key]) for key, title in TOUR_CHAPTERS.items()]
    return tour_report(TOUR_TITLE, TOUR_INTRO, chapters)
