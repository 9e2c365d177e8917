"""The pooled one-expert fit behind ``residuals`` starts is made once per fit and rows."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.preprocessing import StandardScaler

from moekit import MoEClassifier, MoERegressor
from moekit.datasets import load_mcycle
from moekit.fitting import em, starts


def _cases():
    X, y = load_iris(return_X_y=True)
    Xm, ym = load_mcycle()
    rng = np.random.default_rng(0)
    Xp = rng.normal(size=(300, 2))
    yp = rng.poisson(np.exp(0.5 + np.where(Xp[:, 0] > 0, 0.8, -0.6) * Xp[:, 1]))
    return {
        "iris classifier": (lambda: MoEClassifier(3), StandardScaler().fit_transform(X), y),
        "mcycle regressor": (lambda: MoERegressor(3), Xm, ym),
        "poisson, constant gate": (
            lambda: MoERegressor(2, expert="poisson", gate="constant"),
            Xp,
            yp,
        ),
    }


def _fit(make, X, y, seed, monkeypatch, share: bool):
    made = []
    pooled_iterate = starts.EMModel.iterate

    def iterate(self, params, data, max_iter, tol, *args, **kwargs):
        if self.n_experts == 1 and max_iter == starts.POOLED_ITER and tol == 1e-8:
            made.append(1)  # the pooled fit of a residuals start
        return pooled_iterate(self, params, data, max_iter, tol, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(starts.EMModel, "iterate", iterate)
        if not share:
            m.setattr(em, "StartMaker",
                      lambda *a, **k: starts.StartMaker(*a, **{**k, "shared": None}))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make().set_params(random_state=seed).fit(X, y)
    return model, len(made)


@pytest.mark.parametrize("case", list(_cases()))
def test_sharing_the_pooled_fit_changes_no_bit_of_the_fit(case, monkeypatch):
    make, X, y = _cases()[case]
    for seed in (0, 1):
        shared, n_shared = _fit(make, X, y, seed, monkeypatch, share=True)
        alone, n_alone = _fit(make, X, y, seed, monkeypatch, share=False)
        for name in ("coef_", "intercept_"):
            a, b = getattr(shared, name, None), getattr(alone, name, None)
            if a is not None:
                assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), name
        assert shared.log_likelihood_ == alone.log_likelihood_
        assert shared.n_iter_ == alone.n_iter_
        # the fit's own residuals start and its simpler models' (K-1 softmax, K constant)
        # made it once each before; now once per distinct computation
        assert n_alone >= 2 and 1 <= n_shared < n_alone


def test_a_fit_keeps_nothing_for_the_next():
    """The sharing lives in one fit's table of nested fits: two fits make their own."""
    X, y = load_mcycle()
    counts = []
    original = starts.StartMaker._residuals

    def residuals(self):
        counts.append(
            self.shared is not None
            and any(k[0] == "pooled" for k in self.shared if isinstance(k[0], str))
        )
        return original(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(starts.StartMaker, "_residuals", residuals)
        for _ in range(2):
            MoERegressor(3, random_state=0).fit(X, y)
    assert counts[0] is False  # the first residuals start of each fit finds none made
    assert counts.count(False) == 2
