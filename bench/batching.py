"""What the starts cost: a default fit (all its starts) against one start.

    python bench/batching.py            # writes bench/results/batching.md

A default fit runs ``n_init=10`` starts of several kinds (some from fitted simpler
models, see :mod:`moekit.fitting.starts`), short runs of each, the best few to
convergence and the best of those on all the rows. One start (``n_init=1``) is a
k-means start run to convergence. On small data the time of an EM iteration is
per-operation overhead, not arithmetic, so when the starts advance together (one
set of tensor operations per iteration for all of them) the default fit should
cost close to one start: the target is a ratio of at most 2.5.

Cases: mcycle (MASS; ``MoERegressor(n_experts=3)``, gate and experts on ``times``),
iris and digits (``MoEClassifier(n_experts=3)`` on standardised features); and the
other EM estimators: hierarchical (a depth-2 tree of 2 x 2 experts) on mcycle and
iris, Bayesian (K=3) on mcycle. Every
fit on one torch thread; the two settings interleaved, median of ``--repeats``
after one warm-up; the load average at the start and the end is written with
the table. The final log-likelihood of both is shown too: the default fit's must be at
or above the one start's (it contains that start's strategy among its own).

Where the time goes is counted too, for one fit of each setting: the lockstep
rounds (each a batched E-pass or M-step of all the runs going, or one run's where
the families have no batched path) and the start-iterations (the EM iterations of
every run, summed over the runs). Where an iteration is per-operation overhead the
time follows the rounds; where it is arithmetic (digits' 65-column Grams) it
follows the start-iterations, and their ratio is then the floor of the time ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits, load_iris
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from _common import load_line
from moekit import (
    BayesianMoERegressor,
    HierarchicalMoEClassifier,
    HierarchicalMoERegressor,
    MoEClassifier,
    MoERegressor,
)
from moekit.datasets import load_mcycle
from moekit.fitting import em

HERE = Path(__file__).resolve().parent
TARGET = 2.5


def _mcycle(make=lambda **kw: MoERegressor(n_experts=3, **kw)):
    def load():
        X, y = load_mcycle()
        return make, X, y

    return load


def _standardised(loader, make=lambda **kw: MoEClassifier(n_experts=3, **kw)):
    def load():
        X, y = loader(return_X_y=True)
        return make, StandardScaler().fit_transform(X), y

    return load


CASES = {
    "mcycle (133, 1), regressor": _mcycle(),
    "iris (150, 4, 3 classes)": _standardised(load_iris),
    "digits (1797, 64, 10 classes)": _standardised(load_digits),
    "mcycle, hierarchical (depth 2, 2 x 2 experts)": _mcycle(
        lambda **kw: HierarchicalMoERegressor(depth=2, branching=2, **kw)
    ),
    "iris, hierarchical classifier (2 x 2 experts)": _standardised(
        load_iris, lambda **kw: HierarchicalMoEClassifier(depth=2, branching=2, **kw)
    ),
    "mcycle, Bayesian (K=3)": _mcycle(lambda **kw: BayesianMoERegressor(n_experts=3, **kw)),
}


def _fit(make, X, y, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is in the table
        t0 = time.perf_counter()
        model = make(random_state=0, **options).fit(X, y)
        return time.perf_counter() - t0, model


class WorkCount:
    """Counts the lockstep rounds and start-iterations of the fits run inside it."""

    def __enter__(self):
        self.rounds = self.iterations = 0
        self._drive = em.lockstep.drive

        def drive(model, data, runs, *, serve_many=None, on_end=None):
            def counted(kind_model, d, kind, requests):
                self.rounds += 1
                return serve_many(kind_model, d, kind, requests)

            if serve_many is None:  # each request served alone: a round per request
                runs = [self._counted_run(r) for r in runs]
            out = self._drive(model, data, runs, on_end=on_end,
                              serve_many=None if serve_many is None else counted)  # fmt: skip
            self.iterations += sum(len(o[2]) - 1 for o in out)
            return out

        em.lockstep.drive = drive
        return self

    def _counted_run(self, run):
        answer = None
        while True:
            try:
                request = run.send(answer)
            except StopIteration as end:
                return end.value
            self.rounds += 1
            answer = yield request

    def __exit__(self, *exc):
        em.lockstep.drive = self._drive


def run_case(load, repeats: int) -> dict:
    make, X, y = load()
    settings = {"default": {}, "one start": {"n_init": 1}}
    times = {k: [] for k in settings}
    models = {}
    for r in range(repeats + 1):
        for name, options in settings.items():
            elapsed, models[name] = _fit(make, X, y, **options)
            if r > 0:  # the first round warms up
                times[name].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    work = {}
    for name, options in settings.items():
        with WorkCount() as count:
            _fit(make, X, y, **options)
        work[name] = (count.rounds, count.iterations)
    return {
        "work": work,
        "times": med,
        "ratio": med["default"] / med["one start"],
        # the Bayesian fit maximises its ELBO: that is the objective compared
        "objective": {k: float(getattr(m, "elbo_", m.log_likelihood_)) for k, m in models.items()},
        "n_iter": {k: int(m.n_iter_) for k, m in models.items()},
        "converged": {k: bool(m.converged_) for k, m in models.items()},
    }


def _work(res: dict, i: int) -> str:
    d, one = res["work"]["default"][i], res["work"]["one start"][i]
    return f"{d} / {one} = {d / one:.1f}"


def render(results: dict, repeats: int, load_start: str, load_end: str) -> str:
    lines = [
        "# A default fit (all its starts) against one start",
        "",
        f"Generated by `python bench/batching.py`; torch {torch.__version__}, 1 thread for torch, "
        f"BLAS and OpenMP, {platform.machine()}; load average (1/5/15 min) {load_start} at the "
        f"start, {load_end} at the end. Median of {repeats} fits after one warm-up, the two "
        "settings interleaved. `n_experts=3` (hierarchical: `depth=2, branching=2`), "
        "`random_state=0`, defaults otherwise (`n_init=10`); one start: `n_init=1`. "
        "Log-likelihood: `log_likelihood_`, the mean per row, in the target's units (the "
        "Bayesian rows: `elbo_`, the objective its fit maximises).",
        "",
        "| data | default s | one start s | default / one start | log-likelihood default | "
        "log-likelihood one start | converged (iterations) | rounds default / one start | "
        "start-iterations default / one start |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, res in results.items():
        t, o = res["times"], res["objective"]
        conv = ", ".join(
            f"{k}: {'yes' if res['converged'][k] else 'no'} ({res['n_iter'][k]})" for k in t
        )
        lines.append(
            f"| {name} | {t['default']:.4f} | {t['one start']:.4f} | {res['ratio']:.2f} | "
            f"{o['default']:.6f} | {o['one start']:.6f} | {conv} | {_work(res, 0)} | "
            f"{_work(res, 1)} |"
        )
    lines += ["", "## Target", ""]
    for name, res in results.items():
        ok = res["ratio"] <= TARGET
        higher = res["objective"]["default"] >= res["objective"]["one start"] - 1e-9
        lines.append(
            f"- {name}: {res['ratio']:.2f} (target <= {TARGET:g}: {'met' if ok else 'not met'}); "
            f"default log-likelihood at or above one start's: {'yes' if higher else 'no'}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "batching.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    load_start = load_line()
    results = {}
    for name in args.cases:
        load = CASES[name]
        t0 = time.perf_counter()
        results[name] = run_case(load, args.repeats)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    text = render(results, args.repeats, load_start, load_line())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
