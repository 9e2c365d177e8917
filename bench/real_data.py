"""Real data: moekit against R's flexmix on public data sets of R packages.

    python bench/real_data.py            # writes bench/results/real_data.md
    python bench/real_data.py --quick    # three cases, one repeat: a smoke test

The data sets come from R's flexmix, mixtools and MASS packages, exported to CSV
at run time into ``bench/.data/real_data/`` (ignored by git) by
``bench/r/export_datasets.R``; flexmix and moekit read the same file. Each case
is one model fitted by both tools:

- **flexmix**: ``stepFlexmix(formula, k=K, nrep=10, model=FLXMRglm(family),
  concomitant=FLXPmultinom(~z) or FLXPconstant())`` with flexmix's default
  control, the best of its 10 starts kept (``bench/r/fit_flexmix.R``). Its
  default ``minprior=0.05`` removes a component whose prior falls below 0.05;
  the table says how many components were left.
- **moekit**: ``MoERegressor(n_experts=K, gate=..., expert=..., expert_features=...,
  gate_features=..., random_state=0)`` with every other setting at its default,
  and the same with ``n_init=10`` (the table states the defaults it ran with).

R formulas become explicit columns built here from the exported data
(``I(x^2)`` is x squared, ``log(Length)`` the log of Length); a concomitant
formula ``~ z`` is moekit's softmax gate on z (``gate_features``), FLXPconstant
is ``gate="constant"``. Log-likelihoods are totals over the rows: R's
``logLik()`` and moekit's ``log_likelihood(X, y) * n`` (moekit's gate penalty
and Poisson ridge are not included). Parameter counts are flexmix's
``attr(logLik(fit), "df")`` and moekit's ``n_parameters()``.

Wall times are seconds of the whole call: ``system.time`` around ``stepFlexmix``
(R, one thread) and ``time.perf_counter`` around ``fit`` (torch's threads),
medians of ``--repeats`` runs (R with seeds 1, 2, ...; moekit is deterministic).
The target is moekit with ``n_init=10`` at least flexmix's log-likelihood minus
0.05, and no slower.

Diagnostics (second table): flexmix's log-likelihood over its seeds and with
``minprior=0``; moekit's log-likelihood at flexmix's fitted parameters (zero
difference means both fit the same model); and moekit's EM started from
flexmix's fit (``warm_start``), which tells a starting-point shortfall from a
model mismatch. flexmix's parameters are kept next to the data as
``<case>_flexmix_params.csv`` and the designs as ``<case>_design.csv``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import ensure_r
from moekit import MoERegressor
from moekit._core.engine import EM_DTYPE, to_numpy
from moekit.datasets import mcycle_path
from moekit.experts.gaussian import GaussianParams
from moekit.experts.poisson import PoissonParams
from moekit.fitting.em import Params
from moekit.gates.constant import ConstantGateParams
from moekit.gates.softmax import SoftmaxGateParams

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / ".data" / "real_data"
EXPORT_R = HERE / "r" / "export_datasets.R"
FIT_R = HERE / "r" / "fit_flexmix.R"
RESULTS = HERE / "results" / "real_data.md"
NREP = 10
TOL = 0.05


# ---------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One model: ``y ~ expert terms``, a gate on ``gate`` terms (None: constant), K."""

    data: str
    y: str
    expert: tuple[str, ...]
    gate: tuple[str, ...] | None
    family: str  # "gaussian" or "poisson"
    k: int
    source: str

    @property
    def formula(self) -> str:
        return f"{self.y} ~ {' + '.join(self.expert)}"

    @property
    def concomitant(self) -> str:
        return "none" if self.gate is None else f"~ {' + '.join(self.gate)}"

    @property
    def slug(self) -> str:
        gate = "const" if self.gate is None else "gate_" + "_".join(self.gate)
        return f"{self.data}_{self.y}_{self.family}_{gate}_K{self.k}"

    def describe(self) -> str:
        gate = "constant" if self.gate is None else f"softmax on {', '.join(self.gate)}"
        return f"`{self.formula}`, {self.family}, gate {gate}, K={self.k}"


CASES = [
    Case("NPreg", "yn", ("x", "I(x^2)"), None, "gaussian", 2, "flexmix vignette"),
    Case("NPreg", "yp", ("x",), None, "poisson", 2, "flexmix vignette"),
    Case("NPreg", "yp", ("x",), ("x",), "poisson", 2, "flexmix NPreg"),
    Case("mcycle", "accel", ("times",), ("times",), "gaussian", 2, "MASS"),
    Case("mcycle", "accel", ("times",), ("times",), "gaussian", 3, "MASS"),
    Case("GAGurine", "GAG", ("Age",), ("Age",), "gaussian", 4, "MASS"),
    Case("NOdata", "Equivalence", ("NO",), None, "gaussian", 2, "mixtools regmixEM example"),
    Case("tonedata", "tuned", ("stretchratio",), None, "gaussian", 2, "mixtools"),
    Case("CO2data", "CO2", ("GNP",), None, "gaussian", 2, "mixtools regmixEM example"),
    Case("patent", "Patents", ("lgRD",), ("RDS",), "poisson", 3, "flexmix (Wang et al. 1998)"),
    Case("fabricfault", "Faults", ("log(Length)",), None, "poisson", 2, "flexmix"),
    Case(
        "bioChemists",
        "art",
        ("fem", "mar", "kid5", "phd", "ment"),
        None,
        "poisson",
        2,
        "flexmix (Long 1990)",
    ),
]
QUICK = [0, 3, 9]

# R terms that are not plain columns, as numpy functions of the data frame
DERIVED = {
    "I(x^2)": lambda d: d["x"] ** 2,
    "log(Length)": lambda d: np.log(d["Length"]),
}


def design(case: Case, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The columns of the expert and gate terms (named by R's term labels) and y."""
    terms = list(dict.fromkeys(case.expert + (case.gate or ())))
    X = pd.DataFrame(
        {t: (frame[t] if t in frame else DERIVED[t](frame)).astype(np.float64) for t in terms}
    )
    return X, frame[case.y].to_numpy(np.float64)


def make_moekit(case: Case, X: pd.DataFrame, **settings) -> MoERegressor:
    everything = list(X.columns)
    expert = None if list(case.expert) == everything else list(case.expert)
    gate = None if case.gate is None or list(case.gate) == everything else list(case.gate)
    return MoERegressor(
        case.k,
        gate="constant" if case.gate is None else "softmax",
        expert="linear" if case.family == "gaussian" else "poisson",
        expert_features=expert,
        gate_features=gate,
        random_state=0,
        **settings,
    )


# ---------------------------------------------------------------------------- R
def r_versions() -> str:
    code = (
        "cat(R.version$major, '.', R.version$minor, ' flexmix ', "
        "as.character(packageVersion('flexmix')), sep='')"
    )
    res = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True)
    version = res.stdout.strip() if res.returncode == 0 else "(version unknown)"
    return f"R {version} (one thread)"


def export_data() -> None:
    subprocess.run(["Rscript", str(EXPORT_R), str(DATA_DIR)], check=True, capture_output=True)


def run_flexmix(case: Case, minprior: str, repeats: int) -> tuple[dict, pd.DataFrame]:
    out = DATA_DIR / (case.slug + ("_flexmix" if minprior == "default" else "_flexmix_minprior0"))
    cmd = [
        "Rscript",
        str(FIT_R),
        str(DATA_DIR / f"{case.data}.csv"),
        case.formula,
        case.concomitant,
        case.family,
        str(case.k),
        str(NREP),
        minprior,
        str(repeats),
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    summary = pd.read_csv(f"{out}_summary.csv")
    res = dict(zip(summary["name"], summary["value"].astype(float), strict=True))
    res["logliks"] = [res[f"loglik_{r}"] for r in range(1, repeats + 1) if f"loglik_{r}" in res]
    res["seconds"] = float(
        np.median([res[f"seconds_{r}"] for r in range(1, repeats + 1) if f"seconds_{r}" in res])
    )
    return res, pd.read_csv(f"{out}_params.csv")


# ---------------------------------------------------------------------------- moekit
def fit_moekit(
    case: Case, X, y, repeats: int, threads: int | None = None, **settings
) -> tuple[MoERegressor, float, list]:
    """The last fit, the median seconds of ``repeats`` fits and the warnings it raised."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        times = []
        for _ in range(repeats):
            m = make_moekit(case, X, **settings)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                m.fit(X, y)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    names = sorted({type(w.message).__name__ for w in caught})
    return m, float(np.median(times)), names


def params_from_flexmix(m: MoERegressor, table: pd.DataFrame, case: Case) -> Params:
    """flexmix's fitted parameters in moekit's coordinates (standardised x and y).

    moekit's designs are the selected columns of X, standardised, then a column of
    ones; a Gaussian target is standardised too. A slope b on x is b * scale on
    the standardised column, and the intercept absorbs b * mean.
    """
    names = list(m.feature_names_in_)
    mean, scale = to_numpy(m._x_mean), to_numpy(m._x_scale)

    def standardised(comp: pd.DataFrame, part: str, cols) -> np.ndarray:
        rows = comp[comp.part == part]
        values = dict(zip(rows["term"], rows["value"], strict=True))
        cols = range(len(names)) if cols is None else cols
        slopes = np.array([values[names[c]] * scale[c] for c in cols])
        intercept = values["(Intercept)"] + sum(values[names[c]] * mean[c] for c in cols)
        return np.append(slopes, intercept)

    comps = [table[table.component == j] for j in range(1, case.k + 1)]
    coef = np.stack([standardised(c, "coef", m._expert_cols) for c in comps])  # (K, p)
    tensor = lambda a: torch.as_tensor(a, dtype=EM_DTYPE)  # noqa: E731
    if case.family == "gaussian":
        ym, ys = float(m._y_mean[0]), float(m._y_scale[0])
        coef[:, -1] -= ym
        sigma = np.array([c.loc[c.part == "sigma", "value"].iloc[0] for c in comps])
        expert = GaussianParams(tensor(coef / ys)[:, None, :], tensor((sigma / ys) ** 2)[:, None])
    else:
        expert = PoissonParams(tensor(coef))
    if case.gate is None:
        prior = np.array([c.loc[c.part == "prior", "value"].iloc[0] for c in comps])
        gate = ConstantGateParams(tensor(np.log(prior)))
    else:
        gate = SoftmaxGateParams(
            tensor(np.stack([standardised(c, "gate", m._gate_cols) for c in comps]))
        )
    return Params(expert, gate)


def moekit_from_flexmix(case: Case, X, y, table: pd.DataFrame, **settings) -> dict:
    """moekit's log-likelihood at flexmix's fit, and its EM run on from there."""
    m = make_moekit(case, X, max_iter=0, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X, y)  # only the scalings and designs
        m._params = params_from_flexmix(m, table, case)
        at = m.log_likelihood(X, y) * len(y)
        m.set_params(warm_start=True, max_iter=1000)
        m.fit(X, y)
    return {"at": at, "warm": m.log_likelihood(X, y) * len(y), "warm_iter": m.n_iter_}


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="three cases, one repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per fit (median)")
    ap.add_argument("--skip-r", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cases = [CASES[i] for i in QUICK] if args.quick else CASES
    repeats = 1 if args.quick else args.repeats
    load_start = os.getloadavg()
    have_r = False if args.skip_r else ensure_r()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if have_r:
        export_data()
    else:
        print("R is unavailable: flexmix is skipped; moekit fits the CSVs already exported.")
    # the first torch fit of a process pays for its set-up: not any case's time
    x = np.linspace(0, 1, 50)[:, None]
    MoERegressor(2, random_state=0).fit(x, np.sin(6 * x[:, 0]))
    rows = []
    for case in cases:
        path = DATA_DIR / f"{case.data}.csv"
        if not path.exists() and case.data == "mcycle":
            path = Path(mcycle_path())  # the same data, bundled with moekit
        if not path.exists():
            print(f"{case.slug}: no data ({path.name} is exported by R); skipped.")
            continue
        X, y = design(case, pd.read_csv(path))
        X.assign(**{case.y: y}).to_csv(DATA_DIR / f"{case.slug}_design.csv", index=False)
        print(f"{case.slug}: n = {len(y)}", flush=True)
        row = {"case": case, "n": len(y)}
        if have_r:
            flex, table = run_flexmix(case, "default", repeats)
            flex0, _ = run_flexmix(case, "0", 1)
            row.update(flex=flex, flex0=flex0)
            print(f"  flexmix {flex['loglik']:.3f} in {flex['seconds']:.2f} s", flush=True)
            if int(flex["k_found"]) == case.k:
                row["from_flexmix"] = moekit_from_flexmix(case, X, y, table)
                if case.gate is not None:
                    row["from_flexmix_alpha0"] = moekit_from_flexmix(
                        case, X, y, table, gate_alpha=0.0
                    )
        for label, settings in (("default", {}), ("n_init", {"n_init": NREP})):
            m, secs, warned = fit_moekit(case, X, y, repeats, **settings)
            row[label] = {
                "loglik": m.log_likelihood(X, y) * len(y),
                "df": m.n_parameters(),
                "seconds": secs,
                "converged": bool(m.converged_),
                "n_iter": m.n_iter_,
                "warnings": warned,
            }
            print(f"  moekit ({label}) {row[label]['loglik']:.3f} in {secs:.2f} s", flush=True)
        if torch.get_num_threads() > 1:
            row["n_init"]["seconds_1"] = fit_moekit(case, X, y, repeats, 1, n_init=NREP)[1]
        rows.append(row)
    load_end = os.getloadavg()
    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "r": r_versions() if have_r else "R unavailable",
        "load": (load_start, load_end),
        "repeats": repeats,
    }
    report = render(rows, header, have_r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    return 0


# ---------------------------------------------------------------------------- report
DEFAULTS = MoERegressor().get_params()


def defaults_text() -> str:
    names = ("n_init", "init", "max_iter", "tol", "gate_alpha")
    return ", ".join(f"{k}={DEFAULTS[k]!r}" for k in names)


def verdict(row: dict) -> tuple[float | None, str]:
    if "flex" not in row:
        return None, "n/a (no R)"
    gap = row["n_init"]["loglik"] - row["flex"]["loglik"]
    slow = row["n_init"]["seconds"] > row["flex"]["seconds"]
    misses = [w for w, bad in (("log-lik", gap < -TOL), ("time", slow)) if bad]
    return gap, "yes" if not misses else "**no**: " + ", ".join(misses)


def render(rows: list[dict], header: dict, have_r: bool) -> str:
    fmt = lambda v, d=3: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    load = lambda t: " / ".join(f"{v:.2f}" for v in t)  # noqa: E731
    lines = [
        "# Real data: moekit vs flexmix",
        "",
        f"Generated by `python bench/real_data.py`; torch {header['torch']}, "
        f"{header['threads']} threads, {os.cpu_count()} cores; {header['r']}. "
        f"Load average (1/5/15 min) at start {load(header['load'][0])}, "
        f"at end {load(header['load'][1])}.",
        "",
        f"flexmix: `stepFlexmix(..., k=K, nrep={NREP})`, default control. moekit: "
        f"`MoERegressor(n_experts=K, random_state=0)` with the case's gate, expert and "
        f"feature selection, defaults otherwise ({defaults_text()}), and the same with "
        f"`n_init={NREP}`. Total log-likelihoods (higher is better); df = parameter count; "
        f"wall seconds are medians of {header['repeats']} runs. gap = moekit (n_init={NREP}) "
        f"− flexmix; target: gap ≥ −{TOL} and moekit (n_init={NREP}, torch's default "
        f"threads) no slower than flexmix. The last time column is the n_init={NREP} fit "
        "with one torch thread, as R runs.",
        "",
        "| data | model | n | flexmix log-lik | flexmix df | flexmix k left | flexmix s "
        "| moekit log-lik (default) | conv. | moekit log-lik (n_init=10) | conv. | moekit df "
        "| moekit s (default) | moekit s (n_init=10) | gap | target met "
        "| moekit s (n_init=10, 1 thread) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    met = 0
    for row in rows:
        case, flex, d, t = row["case"], row.get("flex"), row["default"], row["n_init"]
        gap, ok = verdict(row)
        met += ok == "yes"
        k_left = "—" if flex is None else f"{int(flex['k_found'])}"
        if flex is not None and int(flex["k_found"]) < case.k:
            k_left = f"**{k_left}**"
        lines.append(
            f"| {case.data} | {case.describe()} | {row['n']} "
            f"| {fmt(flex and flex['loglik'])} | {fmt(flex and flex['df'], 0)} | {k_left} "
            f"| {fmt(flex and flex['seconds'], 2)} "
            f"| {d['loglik']:.3f} | {'yes' if d['converged'] else 'no'} "
            f"| {t['loglik']:.3f} | {'yes' if t['converged'] else 'no'} | {t['df']} "
            f"| {d['seconds']:.2f} | {t['seconds']:.2f} | {fmt(gap)} | {ok} "
            f"| {fmt(t.get('seconds_1'), 2)} |"
        )
    if have_r:
        lines += ["", f"Target met on {met} of {len(rows)} rows."]
    else:
        lines += ["", "R with flexmix is unavailable: no flexmix column, no target."]
    lines += notes(rows)
    if have_r:
        lines += diagnostics(rows)
    return "\n".join(lines) + "\n"


def notes(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        case, flex = row["case"], row.get("flex")
        if flex is not None and int(flex["k_found"]) < case.k:
            out.append(
                f"- {case.data}, K={case.k}: flexmix's default minprior=0.05 removed "
                f"{case.k - int(flex['k_found'])} component(s); its log-likelihood and df "
                f"are those of a {int(flex['k_found'])}-component model."
            )
        elif flex is not None and int(flex["df"]) != row["n_init"]["df"]:
            out.append(
                f"- {case.data}, K={case.k}: flexmix counts {int(flex['df'])} parameters, "
                f"moekit {row['n_init']['df']}."
            )
    return ["", "Notes:", "", *out] if out else []


def diagnostics(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Diagnostics",
        "",
        "- *flexmix over seeds*: the best-of-10 log-likelihood of each timed repeat (seeds "
        "1, 2, ...; the table above shows seed 1).",
        "- *minprior=0*: one stepFlexmix run that keeps every component (k left).",
        "- *at flexmix's fit*: moekit's log-likelihood at flexmix's seed-1 parameters minus "
        "flexmix's; about zero when the two fit the same model.",
        "- *from flexmix's fit*: moekit's EM started at flexmix's parameters "
        "(`warm_start=True`, max_iter=1000) minus flexmix's log-likelihood, with its "
        "iterations; for a softmax gate also with `gate_alpha=0`. Above zero: moekit's "
        "EM holds flexmix's optimum, so a shortfall in the first table comes from its "
        "starts. flexmix's Gaussian M-step divides the weighted residual sum of squares by "
        "(n − rank) n / sum(w) instead of sum(w), so the exact M-step ends a little higher. "
        f"Below zero with the default `gate_alpha={DEFAULTS['gate_alpha']:g}` but not with 0: "
        "the gate's penalty "
        "pulls a steep gate back, so that moekit's penalised optimum is not flexmix's.",
        "- *moekit warnings*: warning classes raised by the n_init=10 fit.",
        "",
        "| data | model | flexmix over seeds | flexmix minprior=0 (k left) "
        "| at flexmix's fit | from flexmix's fit (iter.) | same, gate_alpha=0 (iter.) "
        "| moekit iter. (default / n_init=10) | moekit warnings |",
        "|---|---|---|---|---:|---|---|---|---|",
    ]
    for row in rows:
        case, flex, flex0 = row["case"], row["flex"], row["flex0"]
        seeds = ", ".join(f"{v:.3f}" for v in flex["logliks"])
        zero = f"{flex0['loglik']:.3f} ({int(flex0['k_found'])})"
        fr, fr0 = row.get("from_flexmix"), row.get("from_flexmix_alpha0")
        at = "n/a" if fr is None else f"{fr['at'] - flex['loglik']:+.1e}"
        warm, warm0 = (
            "n/a" if r is None else f"{r['warm'] - flex['loglik']:+.3f} ({r['warm_iter']})"
            for r in (fr, fr0)
        )
        warned = ", ".join(row["n_init"]["warnings"]) or "—"
        lines.append(
            f"| {case.data} | {case.describe()} | {seeds} | {zero} | {at} | {warm} | {warm0} "
            f"| {row['default']['n_iter']} / {row['n_init']['n_iter']} | {warned} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
