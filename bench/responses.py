"""Every kind of response against R's own fit: proportions, amounts, counts, censored times.

    python bench/responses.py            # writes bench/results/responses.md
    python bench/responses.py --quick    # one repeat: a smoke test

Each row is one model fitted by R and by moekit on the same public data set of an R
package (flexmix, MASS, survival, datasets), exported at run time to CSV in
``bench/.data/responses/`` (ignored by git) by ``bench/r/export_responses.R``; R's
calls are run and timed by ``bench/r/fit_calls.R``, as written in the table.

- **Mixtures** (K > 1): flexmix's ``stepFlexmix(..., nrep=10)`` (the best of 10
  starts, default control) against ``MoERegressor(n_experts=K, gate="constant",
  expert=..., random_state=0)`` with its default ``n_init=10``; mclust's
  ``Mclust(d, G, modelNames)`` against the Gaussian mixture moekit fits with no
  features (X of shape (n, 0)) and ``covariance_type`` (VVV, EEE, VVI, VII are
  full, tied, diag, spherical). mclust runs EM once, from a hierarchical
  agglomeration of the rows; so does moekit here: ``n_init=1, init="ward"`` (Ward's
  agglomeration of the standardised rows).
- **One expert** (K = 1): ``glm``, ``MASS::glm.nb`` and ``survival::survreg``
  (gaussian, lognormal and weibull) against ``MoERegressor(n_experts=1, n_init=1)``.

Log-likelihoods are totals over the rows in the same units: R's ``logLik()``,
moekit's ``log_likelihood(X, y, ...) * n``. Both keep every constant: the binomial
coefficient log C(t, s) (flexmix's and glm's ``dbinom``), log y! of counts, and the
Jacobian -sum log y of a lognormal (``survreg`` keeps it; flexmix's Gaussian fit of
log y does not, so it is added to flexmix's value here). R's Gamma fits are not at
the maximum-likelihood shape (``glm`` takes the dispersion from the deviance,
flexmix from its weighted GLM fit), so moekit, whose shape is the MLE, should be
above them. flexmix's Gamma family has the inverse link and moekit's the log link:
the Gamma mixtures here have an intercept or one binary feature, where both links
give the same model.

Rows whose moekit feature this build lacks (an ``offset=``, ``y_upper=`` or
``covariance_type`` it does not take) say "not available in this build" instead of
a number; R's side still runs. Wall times are medians of ``--repeats`` runs (R with
seeds 1, 2, ...; its ``system.time`` around the call, one thread; moekit's
``time.perf_counter`` around ``fit``). Target: moekit ≥ R − 0.05 and no slower.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import ensure_r, load_line
from moekit import MoERegressor

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / ".data" / "responses"
EXPORT_R = HERE / "r" / "export_responses.R"
FIT_R = HERE / "r" / "fit_calls.R"
RESULTS = HERE / "results" / "responses.md"
R_LIBRARIES = ("flexmix", "MASS", "survival", "mclust")
R_PACKAGES = ["r-cran-survival", "r-cran-mclust"]  # beyond _common.R_PACKAGES
NREP = 10
TOL = 0.05
UNAVAILABLE = "not available in this build"


# ---------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One model: R's call on ``d`` (the exported ``data``) and moekit's same model.

    ``y`` names the target column(s) (two for binomial: successes, failures);
    ``x`` the features (empty: an intercept alone); ``offset`` a column of the
    linear predictor's known term; ``event`` the column that is 1 where the time is
    exact and 0 where it is right-censored; ``covariance_type`` several responses'
    covariance. ``r_jacobian``: R's value is of log y, the Jacobian is added.
    """

    capability: str
    data: str
    r_call: str
    expert: str
    k: int
    y: tuple[str, ...]
    x: tuple[str, ...] = ()
    offset: str | None = None
    event: str | None = None
    covariance_type: str | None = None
    r_jacobian: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        cov = f"_{self.covariance_type}" if self.covariance_type else ""
        return f"{self.data}_{self.expert}_K{self.k}{cov}_{zlib.crc32(self.r_call.encode()):08x}"

    @property
    def tool(self) -> str:
        return self.r_call.split("(", 1)[0]


def _flexmix(formula: str, family: str, k: int, extra: str = "") -> str:
    return (f"stepFlexmix({formula}, data = d, k = {k}, nrep = {NREP}, "
            f"model = FLXMRglm(family = \"{family}\"{extra}), verbose = FALSE)")  # fmt: skip


INSURANCE = ("District2", "District3", "District4", "Group2", "Group3", "Group4",
             "Age2", "Age3", "Age4")  # fmt: skip
QUINE = ("Eth2", "Sex2", "Age2", "Age3", "Age4", "Lrn2")
MCLUST = {"full": "VVV", "tied": "EEE", "diag": "VVI", "spherical": "VII"}

# fmt: off
ROWS = [
    # proportions out of trials: flexmix's betablocker vignette (without its `| Center`)
    *(Row("binomial mixture", "betablocker",
          _flexmix("cbind(Deaths, Total - Deaths) ~ Treated", "binomial", k),
          "binomial", k, ("Deaths", "Alive"), ("Treated",)) for k in (2, 3)),
    Row("binomial, one expert", "betablocker",
        "glm(cbind(Deaths, Total - Deaths) ~ Treated, family = binomial, data = d)",
        "binomial", 1, ("Deaths", "Alive"), ("Treated",)),
    # positive amounts
    Row("Gamma mixture", "faithful", _flexmix("eruptions ~ 1", "Gamma", 2), "gamma", 2,
        ("eruptions",)),
    Row("Gamma mixture", "leuk", _flexmix("time ~ ag", "Gamma", 2), "gamma", 2, ("time",),
        ("ag",)),
    Row("Gamma, one expert", "leuk",
        "glm(time ~ logwbc + ag, family = Gamma(link = \"log\"), data = d)", "gamma", 1,
        ("time",), ("logwbc", "ag")),
    Row("lognormal mixture", "faithful", _flexmix("log(eruptions) ~ 1", "gaussian", 2),
        "lognormal", 2, ("eruptions",), r_jacobian=True),
    Row("lognormal, one expert", "leuk",
        "survreg(Surv(time) ~ logwbc + ag, data = d, dist = \"lognormal\")", "lognormal", 1,
        ("time",), ("logwbc", "ag")),
    # over-dispersed counts
    Row("negative binomial, one expert", "quine",
        f"glm.nb(Days ~ {' + '.join(QUINE)}, data = d)", "negative_binomial", 1, ("Days",),
        QUINE),
    # counts per exposure
    Row("Poisson mixture, log exposure as a feature", "Insurance",
        _flexmix("Claims ~ Group_code + Age_code + logHolders", "poisson", 2), "poisson", 2,
        ("Claims",), ("Group_code", "Age_code", "logHolders")),
    Row("Poisson mixture with offset", "Insurance",
        _flexmix("Claims ~ Group_code + Age_code", "poisson", 2, ", offset = d$logHolders"),
        "poisson", 2, ("Claims",), ("Group_code", "Age_code"), offset="logHolders"),
    Row("Poisson with offset, one expert", "Insurance",
        f"glm(Claims ~ {' + '.join(INSURANCE)} + offset(logHolders), family = poisson, "
        "data = d)", "poisson", 1, ("Claims",), INSURANCE, offset="logHolders"),
    # censored times
    *(Row(f"{dist} right-censored, one expert", "lung",
          f"survreg(Surv(time, event) ~ age + female, data = d, dist = \"{dist}\")",
          expert, 1, ("time",), ("age", "female"), event="event")
      for dist, expert in (("gaussian", "linear"), ("lognormal", "lognormal"),
                           ("weibull", "weibull"))),
    # several responses, no features
    *(Row("Gaussian mixture of several responses", data,
          f"Mclust(d, G = {k}, modelNames = \"{MCLUST[cov]}\", verbose = FALSE)", "linear", k,
          cols, covariance_type=cov)
      for data, k, cols in (("faithful", 2, ("eruptions", "waiting")),
                            ("iris", 3, ("SepalLength", "SepalWidth", "PetalLength",
                                         "PetalWidth")))
      for cov in MCLUST),
]
# fmt: on


def derived(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns R's formulas compute and moekit is given: failures of the trials."""
    if {"Deaths", "Total"} <= set(frame.columns):
        frame = frame.assign(Alive=frame["Total"] - frame["Deaths"])
    return frame


# ---------------------------------------------------------------------------- moekit
def missing_feature(row: Row) -> str | None:
    """The moekit keyword this row needs and this build lacks, else None."""
    fit_args = inspect.signature(MoERegressor.fit).parameters
    if row.offset is not None and "offset" not in fit_args:
        return "fit(offset=)"
    if row.event is not None and "y_upper" not in fit_args:
        return "fit(y_upper=)"
    if row.covariance_type is not None and "covariance_type" not in MoERegressor().get_params():
        return "covariance_type"
    return None


def moekit_inputs(row: Row, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, dict]:
    """X, y and the keyword arguments of fit and log_likelihood for the row."""
    X = frame[list(row.x)].to_numpy(np.float64) if row.x else np.zeros((len(frame), 0))
    y = frame[list(row.y)].to_numpy(np.float64)
    y = y[:, 0] if y.shape[1] == 1 and row.covariance_type is None else y
    kw = {}
    if row.offset is not None:
        kw["offset"] = frame[row.offset].to_numpy(np.float64)
    if row.event is not None:  # y in [y, y_upper]: y_upper = y where exact, inf if censored
        kw["y_upper"] = np.where(frame[row.event].to_numpy() == 1, y, np.inf)
    return X, y, kw


def fit_moekit(row: Row, frame: pd.DataFrame, repeats: int) -> dict:
    """moekit's log-likelihood, parameters and median fit seconds, or why it has none."""
    missing = missing_feature(row)
    if missing is not None:
        return {"unavailable": missing}
    X, y, kw = moekit_inputs(row, frame)
    settings = {"n_init": NREP if row.k > 1 else 1}
    if row.covariance_type:  # mclust's one EM run from an agglomeration, as mclust
        settings = {"covariance_type": row.covariance_type, "n_init": 1, "init": "ward"}
    note = ""
    if X.shape[1] == 0 and row.covariance_type is None:
        try:  # an intercept alone: X of shape (n, 0) where this build takes it
            MoERegressor(1, expert=row.expert, n_init=1, max_iter=1).fit(X, y)
        except ValueError:  # else one constant column, whose slope is not identified
            X = np.ones((len(y), 1))
            note = "X is one constant column (this build refuses X of shape (n, 0))"
    times = []
    for _ in range(repeats):
        m = MoERegressor(row.k, gate="constant", expert=row.expert, random_state=0, **settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                m.fit(X, y, **kw)
            except TypeError as exc:  # a keyword this build does not take after all
                return {"unavailable": str(exc).split("\n")[0]}
            times.append(time.perf_counter() - t0)
    return {
        "loglik": m.log_likelihood(X, y, **kw) * len(y),
        "df": m.n_parameters(),
        "seconds": float(np.median(times)),
        "k_left": len(np.atleast_1d(m.expert_sizes_)),
        "converged": bool(m.converged_),
        "warnings": sorted({type(w.message).__name__ for w in caught}),
        "note": note,
    }


# ---------------------------------------------------------------------------- R
def run_r(rows: list[Row], repeats: int) -> dict[str, dict]:
    """R's log-likelihood, df and median seconds of every row, by row id."""
    cases = pd.DataFrame({"id": [r.id for r in rows], "data": [r.data for r in rows],
                          "call": [r.r_call for r in rows]})  # fmt: skip
    cases_csv, out_csv = DATA_DIR / "r_cases.csv", DATA_DIR / "r_fits.csv"
    cases.to_csv(cases_csv, index=False)
    subprocess.run(["Rscript", str(FIT_R), str(cases_csv), str(DATA_DIR), str(repeats),
                    str(out_csv)], check=True, capture_output=True)  # fmt: skip
    fits = pd.read_csv(out_csv, keep_default_na=False, na_values=["NA"])
    out = {}
    for rec in fits.to_dict("records"):
        row = next(r for r in rows if r.id == rec["id"])
        if row.r_jacobian and np.isfinite(rec["loglik"]):
            y = pd.read_csv(DATA_DIR / f"{row.data}.csv")[row.y[0]].to_numpy(np.float64)
            rec["loglik"] -= float(np.log(y).sum())
        out[rec["id"]] = rec
    return out


def r_versions() -> str:
    code = ("cat(R.version$major, '.', R.version$minor, sep=''); for (p in c('flexmix', "
            "'MASS', 'survival', 'mclust')) cat(' ', p, ' ', as.character(packageVersion(p)), "
            "sep='')")  # fmt: skip
    res = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True)
    return f"R {res.stdout.strip()}" if res.returncode == 0 else "R (version unknown)"


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per fit (median)")
    ap.add_argument("--skip-r", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    load_start = load_line()
    have_r = False if args.skip_r else ensure_r(R_LIBRARIES, R_PACKAGES)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if have_r:
        subprocess.run(["Rscript", str(EXPORT_R), str(DATA_DIR)], check=True,
                       capture_output=True)  # fmt: skip
    else:
        print("R is unavailable: R's rows are skipped; moekit fits the CSVs already exported.")
    rows = [r for r in ROWS if (DATA_DIR / f"{r.data}.csv").exists()]
    for r in sorted({r.data for r in ROWS} - {r.data for r in rows}):
        print(f"{r}: no data ({r}.csv is exported by R); its rows are skipped.")
    r_fits = run_r(rows, repeats) if have_r and rows else {}
    # the first torch fit of a process pays for its set-up: not any row's time
    x = np.linspace(0, 1, 50)[:, None]
    MoERegressor(2, random_state=0).fit(x, np.sin(6 * x[:, 0]))
    results = []
    for row in rows:
        frame = derived(pd.read_csv(DATA_DIR / f"{row.data}.csv"))
        mk = fit_moekit(row, frame, repeats)
        results.append((row, len(frame), r_fits.get(row.id), mk))
        said = mk.get("unavailable") or f"{mk['loglik']:.3f} in {mk['seconds']:.3f} s"
        rs = r_fits.get(row.id)
        theirs = "—" if rs is None else f"{rs['loglik']:.3f}"
        print(f"{row.data}, {row.capability}, K={row.k}: R {theirs}; moekit {said}", flush=True)
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "r": r_versions() if have_r else "R unavailable",
              "load": (load_start, load_line()), "repeats": repeats}  # fmt: skip
    report = render(results, header)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    return 0


# ---------------------------------------------------------------------------- report
def verdict(r: dict | None, mk: dict) -> tuple[str, str]:
    """(gap, target met) of one row, as the table writes them."""
    if "unavailable" in mk:
        return "—", UNAVAILABLE
    if r is None or not np.isfinite(r["loglik"]):
        return "—", "n/a (no R fit)"
    gap = mk["loglik"] - r["loglik"]
    misses = [w for w, bad in (("log-lik", gap < -TOL), ("time", mk["seconds"] > r["seconds"]))
              if bad]  # fmt: skip
    return f"{gap:+.3f}", "yes" if not misses else "**no**: " + ", ".join(misses)


def render(results: list, header: dict) -> str:
    fmt = lambda v, d=3: "—" if v is None or not np.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "# Every kind of response: moekit vs R",
        "",
        f"Generated by `python bench/responses.py`; torch {header['torch']}, "
        f"{header['threads']} threads, {os.cpu_count()} cores; {header['r']}. Load average "
        f"(1/5/15 min) at start {header['load'][0]}, at end {header['load'][1]}.",
        "",
        f"R's call is in the table (`d` is the exported data set). moekit: "
        f'`MoERegressor(n_experts=K, gate="constant", expert=..., random_state=0)`, '
        f"`n_init={NREP}` for K > 1 (flexmix's nrep) and 1 for K = 1; against mclust, "
        '`n_init=1, init="ward"` (one EM run from an agglomeration of the rows, as '
        "mclust's). Total "
        "log-likelihoods in the same units (every constant kept; see the script's "
        f"docstring); df = parameter count; wall seconds are medians of {header['repeats']} "
        f"runs. gap = moekit − R; target: gap ≥ −{TOL} and moekit no slower than R.",
        "",
        "| capability | data | R's call | n | R log-lik | R df | R s | moekit expert, K "
        "| moekit log-lik | moekit df | moekit s | gap | target met |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    met = runnable = 0
    notes = []
    for row, n, r, mk in results:
        gap, ok = verdict(r, mk)
        met += ok == "yes"
        runnable += "unavailable" not in mk and r is not None
        expert = row.expert + (f" ({row.covariance_type})" if row.covariance_type else "")
        if "unavailable" in mk:
            ours = [UNAVAILABLE, "—", "—"]
        else:
            k_left = "" if mk["k_left"] == row.k else f" ({mk['k_left']} left)"
            ours = [fmt(mk["loglik"]) + k_left, str(mk["df"]), fmt(mk["seconds"])]
            if mk["note"]:
                notes.append(f"- {row.data}, {row.capability}: {mk['note']}.")
            if mk["warnings"]:
                notes.append(f"- {row.data}, {row.capability}: moekit warned "
                             f"{', '.join(mk['warnings'])}.")  # fmt: skip
        if r is not None and r.get("error"):
            notes.append(f"- {row.data}, {row.capability}: R failed: {r['error']}")
        rll = fmt(r and r["loglik"]) + (" (+ Jacobian)" if row.r_jacobian else "")
        lines.append(
            f"| {row.capability} | {row.data} | `{row.r_call}` | {n} | {rll} "
            f"| {fmt(r and r['df'], 0)} | {fmt(r and r['seconds'])} | {expert}, K={row.k} "
            f"| {' | '.join(ours)} | {gap} | {ok} |"
        )
    lines += ["", f"Target met on {met} of {runnable} rows that both sides ran "
              f"({len(results)} rows in all)."]  # fmt: skip
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
