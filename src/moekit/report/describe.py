"""A fitted model in words and numbers: one source for the report and the terminal.

The HTML report (:mod:`moekit.report.sections`), ``moekit fit``'s printed summary
and ``moekit inspect`` all take a model's numbers from here, and here only from the
fitted model's own attributes (``coef_``, ``intercept_``, ``noise_std_``, ``df_``,
``gate_coef_``, ``gate_intercept_``, ``expert_sizes_``) or its ``summary()``. The
attributes are full width (one column per feature of X, zero where a part does not
see the feature); a part's coefficients are paired with names by the column indices
that part sees, never by position in a shorter list.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

WIDTH = 92
"""Characters per line of the texts (the model's formula, the coefficient tables'
notes): they wrap there, so that they stay inside the report's page and a terminal."""


def feature_names(model: Any, d: int | None = None) -> list[str]:
    """The names the model was fitted with, else ``x0, x1, ...``."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        return [str(n) for n in names]
    d = model.n_features_in_ if d is None else d
    return [f"x{j}" for j in range(d)]


def _columns(model: Any, part: str) -> np.ndarray:
    """Indices of the features that ``part`` ("expert" or "gate") sees."""
    cols = getattr(model, f"_{part}_cols", None)
    return np.arange(model.n_features_in_) if cols is None else np.asarray(cols)


def _num(v: float) -> str:
    return f"{float(v):.4g}"


def format_value(v: Any) -> str:
    """A table's cell as text: floats to four significant digits, the rest as ``str``."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def text_report(model: Any, X, y, summary=None, reason: str = "", target: str = "y",
                rows: dict | None = None) -> str:  # fmt: skip
    """What ``moekit fit`` prints: the fit's statistics, the model written out (for a
    regression) and the coefficient table, or the sentence saying why there is none.
    ``rows``: the fit's ``sample_weight``, ``offset`` and ``y_upper``, if any."""
    lines = [f"  {label}: {format_value(value)}" for label, value in fit_facts(model, X, y, rows)]
    if not hasattr(model, "predict_proba"):
        lines += ["", model_formula(model, feature_names(model, X.shape[1]), target)]
    if summary is None and not reason:
        summary, reason = coefficient_summary(model, X, y, rows=rows)
    lines += ["", summary_text(summary) if summary is not None else
              "\n".join(textwrap.wrap(f"No coefficient table: {reason}", WIDTH))]  # fmt: skip
    return "\n".join(lines)


def linear_terms(intercept: float, slopes: np.ndarray, names: list[str]) -> list[str]:
    """``a + b1·x1 - b2·x2`` as its terms: ``["a", "+ b1·x1", "- b2·x2"]``."""
    return [_num(intercept)] + [
        f"{'-' if b < 0 else '+'} {_num(abs(b))}·{n}" for b, n in zip(slopes, names, strict=True)
    ]


def wrap_terms(head: str, terms: list[str], tail: str = "", width: int = WIDTH) -> list[str]:
    """``head`` followed by ``terms`` and ``tail``, broken between terms into lines of at
    most ``width`` characters (a term longer than a line keeps its own line); the
    continuation lines are indented under the first term."""
    indent = " " * min(len(head), width // 2)
    lines, line = [], head
    items = [*terms[:-1], terms[-1] + tail] if terms else [tail]
    for i, term in enumerate(items):
        piece = term if i == 0 else " " + term
        if i > 0 and len(line) + len(piece) > width:
            lines.append(line)
            line = indent + term
        else:
            line += piece
    return [*lines, line]


def _family(model: Any, k: int) -> str:
    expert = getattr(model, "expert", "linear")
    if isinstance(expert, (list, tuple)):
        expert = expert[k]
    return expert if isinstance(expert, str) else type(expert).__name__


def expert_lines(model: Any, names: list[str], target: str) -> list[str]:
    """One line (wrapped) per expert: its family and its parameters in the data's units."""
    try:
        coef, icpt = np.asarray(model.coef_), np.asarray(model.intercept_)
    except AttributeError:  # networks: no coefficient array
        K = len(np.atleast_1d(model.expert_sizes_))
        return [f"  expert {k}: a {_family(model, k)} expert (a network; no closed form to print)"
                for k in range(K)]  # fmt: skip
    if coef.ndim == 2:  # one output: (K, d) -> (K, 1, d)
        coef, icpt = coef[:, None, :], icpt[:, None]
    cols = _columns(model, "expert")
    enames = [names[c] for c in cols]
    sd = _optional(model, "noise_std_")
    df = _optional(model, "df_")
    if sd is not None and sd.ndim == 1:
        sd = sd[:, None]
    formula = getattr(model, "formula_", None)
    term = getattr(model, "offset_term_", None) or " + ".join(getattr(formula, "offset_terms", []))
    offset = [f"+ {term}"] if term else []  # known, coefficient 1
    lines = []
    for k in range(coef.shape[0]):
        for j in range(coef.shape[1]):
            who = f"expert {k}" + (f", output {j}" if coef.shape[1] > 1 else "")
            terms = linear_terms(icpt[k, j], coef[k, j, cols], enames) + offset
            family = _family(model, k)
            if family == "zero":  # a family per expert: NaN coefficients, none to print
                lines.append(f"  {who}: a point mass at 0")
            elif family == "poisson":
                lines += wrap_terms(f"  {who}: Poisson with log mean = ", terms)
            elif family == "student_t" and sd is not None and df is not None:
                lines += wrap_terms(f"  {who}: t(location = ", terms,
                                    f", scale = {_num(sd[k, j])}, df = {_num(df[k])})")  # fmt: skip
            elif family == "linear" and sd is not None:
                lines += wrap_terms(f"  {who}: N(mean = ", terms, f", sd = {_num(sd[k, j])})")
            else:
                lines += wrap_terms(f"  {who} ({family}): linear predictor = ", terms)
    return lines


def _optional(model: Any, attr: str) -> np.ndarray | None:
    try:
        return np.asarray(getattr(model, attr))
    except AttributeError:
        return None


def _node_names(branching: int, depth: int) -> list[str]:
    """Internal nodes level by level from the root: "root", then their paths "0", "1", "0.1"."""
    out = []
    for level in range(depth):
        for j in range(branching**level):
            digits = [str((j // branching**i) % branching) for i in reversed(range(level))]
            out.append(".".join(digits) if digits else "root")
    return out


def gate_lines(model: Any, names: list[str]) -> list[str]:
    """The gate g(x) written out: constant weights, softmax scores, or a tree of them."""
    K = len(np.atleast_1d(model.expert_sizes_))
    gate = getattr(model, "gate", "softmax")
    if K == 1:
        return ["  g(x) = 1: one expert"]
    if gate == "constant":
        v = np.asarray(model.gate_intercept_, dtype=float)
        w = np.exp(v - v.max())
        w /= w.sum()
        return ["  g(x) = (" + ", ".join(f"{p:.3f}" for p in w) + "), whatever x"]
    if gate != "softmax":
        return [f"  g(x): a {gate} gate (a network; no closed form to print); the figure "
                "'Where the gate sends each input' draws it"]  # fmt: skip
    coef, icpt = np.asarray(model.gate_coef_), np.asarray(model.gate_intercept_)
    cols = _columns(model, "gate")
    gnames = [names[c] for c in cols]
    if coef.ndim == 3:  # a tree: (n_nodes, branching, d)
        nodes = _node_names(coef.shape[1], getattr(model, "depth", 1))
        lines = ["  g_k(x) = product, over the nodes on the path from the root to leaf k, of",
                 "  the node's softmax over its children c of s_node,c(x), with"]  # fmt: skip
        for i, node in enumerate(nodes):
            for c in range(coef.shape[1]):
                lines += wrap_terms(f"    s_{node},{c}(x) = ",
                                    linear_terms(icpt[i, c], coef[i, c, cols], gnames))  # fmt: skip
        return lines
    lines = ["  g(x) = softmax over k of s_k(x), with"]
    for k in range(coef.shape[0]):
        lines += wrap_terms(f"    s_{k}(x) = ", linear_terms(icpt[k], coef[k, cols], gnames))
    return lines


def model_formula(model: Any, names: list[str] | None = None, target: str = "y") -> str:
    """The fitted regression mixture written out, in the data's units.

    Parameters
    ----------
    model : fitted MoERegressor or HierarchicalMoERegressor
    names : list of str, optional
        Names of X's columns (default: the model's, else ``x0, x1, ...``).
    target : str

    Returns
    -------
    str
        p(y | x) = sum_k g_k(x) p_k(y | x), then each expert p_k and the gate g,
        lines of at most :data:`WIDTH` characters.
    """
    names = feature_names(model) if names is None else list(names)
    K = len(np.atleast_1d(model.expert_sizes_))
    lines = [f"p({target} | x) = sum over k = 1..{K} of g_k(x) p_k({target} | x), where"]
    return "\n".join([*lines, *expert_lines(model, names, target), *gate_lines(model, names)])


def fitted_experts(model: Any) -> int:
    """The experts the fitted model has: ``n_experts`` less those EM removed."""
    return len(np.atleast_1d(model.expert_sizes_))


def experts_text(model: Any) -> str:
    """``"4"``, or ``"6 (2 of the 8 asked for were removed during EM: under
    min_share of the rows)"``."""
    K, removed = fitted_experts(model), int(getattr(model, "n_experts_removed_", 0) or 0)
    if not removed:
        return str(K)
    share = getattr(model, "min_share", None)
    return (
        f"{K} ({removed} of the {K + removed} asked for were removed during EM: they held "
        f"under {f'{share:.0%}' if share is not None else 'the minimum share'} of the rows)"
    )


def expert_shares(model: Any) -> np.ndarray:
    """Each expert's share of the data, sum_i r_ik / n: fractions that sum to 1."""
    sizes = np.asarray(model.expert_sizes_, dtype=float)
    return sizes / sizes.sum()


def coefficient_summary(model: Any, X, y, information_rows: int | None = None,
                        rows: dict | None = None):  # fmt: skip
    """``(summary, reason)``: the model's coefficient table with standard errors, or None
    and the sentence that says why it has none (network experts or gates). ``rows``:
    the fit's ``sample_weight``, ``offset`` and censoring bounds (frequency weights
    count as rows; censored rows by their intervals)."""
    terms = {k: v for k, v in (rows or {}).items()
             if k in ("sample_weight", "offset", "y_upper", "truncation")}  # fmt: skip
    try:
        return model.summary(X, y, information_rows=information_rows, **terms), ""
    except ValueError as exc:
        if "no coefficients to report" not in str(exc):
            raise
        return None, str(exc)


def summary_text(summary) -> str:
    """A ``Summary`` as text: per block, a table headed by its column names (no
    empty row under them), significance stars, and the note wrapped at :data:`WIDTH`."""
    from moekit.estimators.inference import _stars

    lines = [summary.title, f"n = {summary.n_samples}, log-likelihood = "
             f"{summary.log_likelihood:.4f}", ""]  # fmt: skip
    head = ["parameter", "estimate", "std_error", "z_value", "p_value", ""]
    for block, part in summary.table.groupby("block", sort=False):
        rows = [head] + [
            [str(r.parameter), *(_cell(v) for v in (r.estimate, r.std_error, r.z_value,
                                                    r.p_value)), _stars(r.p_value)]
            for r in part.itertuples()
        ]  # fmt: skip
        widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
        lines.append(f"{block}:")
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                 zip(row[1:], widths[1:], strict=True)]  # fmt: skip
            lines.append(("  " + "  ".join(cells)).rstrip())
        lines.append("")
    lines.append("Signif. codes: 0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1")
    if summary.note:
        lines += ["", *textwrap.wrap(f"Note: {summary.note}", WIDTH, subsequent_indent="  ")]
    return "\n".join(lines)


def _cell(v: float) -> str:
    return "NA" if not np.isfinite(v) else f"{v:.4g}"


def fit_facts(model: Any, X, y, rows: dict | None = None) -> list[tuple[str, Any]]:
    """The fit's statistics on its rows: its experts, log-likelihood per row, BIC, AIC
    and EM's run.

    ``rows`` holds the fit's ``sample_weight`` (frequency weights: n = sum_i w_i, and
    the log-likelihood per row is sum_i w_i log p(y_i | x_i) / n), ``offset`` and
    ``y_upper`` (censored responses: log P(y <= Y <= y_upper | x)), if any.
    """
    rows = rows or {}
    w = rows.get("sample_weight")
    n = len(y) if w is None else float(np.sum(w))
    ll = float(model.log_likelihood(X, y, **rows))
    p = int(model.n_parameters())
    said = []
    if w is not None:
        said.append(("weights", f"frequency weights: n = {n:g} (their sum) over {len(y)} rows"))
    if rows.get("offset") is not None:
        said.append(("offset", "a known term of the experts' linear predictor"))
    if rows.get("y_upper") is not None:
        censored = int(np.isinf(np.asarray(rows["y_upper"])).sum())
        said.append(("censoring", f"{censored} of {len(y)} responses right-censored"))
    return [
        ("experts", experts_text(model)),
        *said,
        ("log-likelihood per row (fitted rows)", ll),
        ("BIC", -2.0 * n * ll + p * np.log(n)),
        ("AIC", -2.0 * n * ll + 2.0 * p),
        ("parameters", p),
        ("EM", f"{model.n_iter_} iteration{'s' * (model.n_iter_ != 1)}, "
               f"{'converged' if model.converged_ else 'NOT converged'}"),
    ]  # fmt: skip


# ------------------------------------------------------------ what fits each family
COUNT_VALUES = 25
"""Count values compared one by one (0, 1, ..., 24); larger counts share one tail bin."""

PROPORTION_BINS = 10
"""Groups of rows (by expected proportion, equal sizes) in the binomial comparison."""


def family_kind(d: Any) -> str:
    """Which check fits a predictive mixture's family: ``"count"`` (Poisson, negative
    binomial, a point mass at zero and mixtures of them), ``"binomial"``, ``"positive"``
    (Gamma, lognormal, Weibull) or ``""`` (the coverage table alone)."""
    from moekit._core.components import component_family

    names = d.family if isinstance(d.family, list) else [d.family]  # one per component
    if "binomial" in names:
        return "binomial"
    if component_family(d.family).discrete:
        return "count"
    return "positive" if set(names) <= {"gamma", "lognormal", "weibull", "zero"} else ""


def count_frequencies(d: Any, y, most: int = COUNT_VALUES) -> list[list[Any]]:
    """Observed against expected numbers of rows at each count, zeros first.

    .. math::  O_j = \\#\\{i : y_i = j\\}, \\qquad
               E_j = \\sum_i P(Y_i = j \\mid x_i) = \\sum_i \\sum_k g_k(x_i)\\, p_k(j \\mid x_i),

    for j = 0, 1, ..., up to the largest count seen or ``most`` - 1; beyond, one
    tail bin "≥ j" with E = sum_i P(Y_i >= j | x_i). The E_j sum to n when the tail
    bin is there. Rows: [value, observed, expected].
    """
    y = np.asarray(y, dtype=float).reshape(-1)
    top = int(min(y.max(), most - 1))
    rows = []
    for j in range(top + 1):
        expected = float(np.exp(d.logpdf(np.full(len(y), float(j)))).sum())
        rows.append([str(j), int((y == j).sum()), expected])
    if y.max() > top:  # the tail: P(Y >= top + 1) = 1 - F(top)
        tail = float((1.0 - d.cdf(np.full(len(y), float(top)))).sum())
        rows.append([f">= {top + 1}", int((y > top).sum()), tail])
    return rows


def binomial_proportions(d: Any, y, groups: int = PROPORTION_BINS) -> list[list[Any]]:
    """Observed against expected proportions of successes, in groups of rows.

    y is (successes, failures) per row and t_i = s_i + f_i; the mixture's success
    probability is pi_i = E[one trial | x_i] = sum_k g_k(x_i) pi_k(x_i). Rows sorted
    by pi_i are cut into ``groups`` groups of (nearly) equal size G, each reported as

    .. math::  \\hat p_G = \\frac{\\sum_{i \\in G} s_i}{\\sum_{i \\in G} t_i}, \\qquad
               \\bar p_G = \\frac{\\sum_{i \\in G} t_i \\pi_i}{\\sum_{i \\in G} t_i}

    (a calibration table, as Hosmer and Lemeshow's). Rows: [group, rows, trials,
    expected proportion, observed proportion].
    """
    y = np.asarray(y, dtype=float)
    s, t = y[:, 0], y.sum(1)
    p = np.asarray(d.mean(), dtype=float).reshape(-1)
    out = []
    for g, rows in enumerate(np.array_split(np.argsort(p, kind="stable"), min(groups, len(p)))):
        trials = float(t[rows].sum())
        out.append([g + 1, len(rows), trials, float((t[rows] * p[rows]).sum() / trials),
                    float(s[rows].sum() / trials)])  # fmt: skip
    return out


def pit_values(d: Any, y, y_upper=None) -> tuple[np.ndarray, np.ndarray]:
    """The probability integral transform u_i = F(y_i | x_i) and whether each is exact.

    Where the model is right, the u_i of exact responses are uniform on (0, 1). A
    right-censored row (``y_upper`` infinite: y_i is a lower bound) only says
    U_i >= F(y_i), so its u_i = F(y_i) is returned as censored (event 0); a row known
    to lie in a finite interval [y_i, y_upper_i] gets the middle of its probabilities,
    (F(y_i) + F(y_upper_i)) / 2, as exact. Returns (u, event), each (n,).
    """
    y = np.asarray(y, dtype=float).reshape(-1)
    if y_upper is None:
        return np.asarray(d.cdf(y), dtype=float), np.ones(len(y))
    upper = np.asarray(y_upper, dtype=float).reshape(-1)
    right = np.isinf(upper) & (upper > 0)
    lo = np.where(np.isfinite(y), d.cdf(np.where(np.isfinite(y), y, 0.0)), 0.0)
    hi = np.where(right, 1.0, d.cdf(np.where(right, y, upper)))
    exact = upper == y
    u = np.where(exact | right, lo, 0.5 * (lo + hi))
    return u, (~right).astype(float)


def pp_points(u, event=None) -> tuple[np.ndarray, np.ndarray]:
    """P-P points of PIT values against the uniform: (u_(j), F_hat(u_(j))) at each
    exact u, with F_hat the Kaplan-Meier estimate of U's distribution (censored u are
    lower bounds); without censoring F_hat(u_(j)) = j / n, the empirical CDF.

    .. math::  \\hat F(u) = 1 - \\prod_{u_{(j)} \\le u,\\ \\text{exact}}
               \\Big(1 - \\frac{1}{\\#\\{i : u_i \\ge u_{(j)}\\}}\\Big)
    """
    u = np.asarray(u, dtype=float).reshape(-1)
    event = np.ones(len(u)) if event is None else np.asarray(event, dtype=float).reshape(-1)
    order = np.lexsort((1.0 - event, u))  # at ties, exact before censored (KM's convention)
    u, event = u[order], event[order]
    at_risk = len(u) - np.arange(len(u))
    survival = np.cumprod(np.where(event > 0, 1.0 - 1.0 / at_risk, 1.0))
    keep = event > 0
    return u[keep], 1.0 - survival[keep]


def pp_distance(u, event=None) -> float:
    """The largest vertical distance of the P-P points from the diagonal, max |F_hat(u) - u|
    (Kolmogorov's statistic, taken at the exact points and just before each)."""
    x, f = pp_points(u, event)
    if len(x) == 0:
        return float("nan")
    before = np.concatenate([[0.0], f[:-1]])
    return float(max(np.abs(f - x).max(), np.abs(before - x).max()))
