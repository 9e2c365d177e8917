"""A fit of one expert whose family has one optimum alone makes one start."""

import numpy as np
import pytest

from moekit import MoEClassifier, MoERegressor
from moekit.fitting import starts


def _data(expert, rng):
    X = rng.normal(size=(150, 2))
    eta = 0.3 + 0.5 * X[:, 0] - 0.2 * X[:, 1]
    return X, {
        "linear": eta + 0.4 * rng.normal(size=150),
        "poisson": rng.poisson(np.exp(eta)),
        "gamma": np.exp(eta) * rng.gamma(3.0, 1 / 3.0, size=150),
        "negative_binomial": rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(eta))),
        "lognormal": np.exp(eta + 0.3 * rng.normal(size=150)),
        "weibull": np.exp(eta) * rng.weibull(2.0, size=150),
        "student_t": eta + 0.4 * rng.standard_t(3, size=150),
    }[expert]


def _count_starts(monkeypatch):
    made = []
    make = starts.StartMaker.make

    def counted(self, strategy):
        made.append(strategy)
        return make(self, strategy)

    monkeypatch.setattr(starts.StartMaker, "make", counted)
    return made


@pytest.mark.parametrize(
    "expert", ["linear", "poisson", "gamma", "negative_binomial", "lognormal", "weibull"]
)
def test_one_expert_of_one_optimum_makes_one_start(expert, monkeypatch):
    X, y = _data(expert, np.random.default_rng(0))
    made = _count_starts(monkeypatch)
    one = MoERegressor(1, expert=expert, n_init=10, random_state=0).fit(X, y)
    assert len(made) == 1
    # the start it skips would reach the same maximum: n_init=1 is the same fit
    other = MoERegressor(1, expert=expert, n_init=1, random_state=3).fit(X, y)
    assert one.log_likelihood(X, y) == pytest.approx(other.log_likelihood(X, y), abs=1e-9)


def test_one_logistic_expert_makes_one_start(monkeypatch):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 2))
    y = (X[:, 0] + 0.5 * rng.normal(size=150) > 0).astype(int)
    made = _count_starts(monkeypatch)
    MoEClassifier(1, n_init=10, random_state=0).fit(X, y)
    assert len(made) == 1


def test_families_of_several_optima_keep_their_starts(monkeypatch):
    """Student-t experts (a t likelihood can have several maxima in its location), and
    every fit of two experts, still run every start."""
    X, y = _data("student_t", np.random.default_rng(0))
    made = _count_starts(monkeypatch)
    MoERegressor(1, expert="student_t", n_init=4, random_state=0).fit(X, y)
    assert len(made) >= 4  # (and a start from the Gaussian fit it contains)
    made.clear()
    MoERegressor(2, expert="linear", n_init=4, random_state=0).fit(X, y)
    assert len(made) >= 4
