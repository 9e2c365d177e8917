"""summary(information_rows=m): the observed information estimated on m random rows."""

import numpy as np
import pytest

from moekit import MoERegressor
from moekit.datasets import make_moe_regression


def test_information_from_a_subset_estimates_the_full_one_and_says_so():
    X, y, _ = make_moe_regression(6000, n_features=2, n_experts=2, random_state=0)
    m = MoERegressor(2, n_init=2, random_state=0).fit(X, y)
    full = m.summary(X, y)
    part = m.summary(X, y, information_rows=3000)
    assert "estimated from 3,000 random rows of 6,000" in part.note
    assert "random rows" not in full.note
    # the same estimates and total log-likelihood; standard errors close (half the rows)
    np.testing.assert_allclose(part.table.estimate, full.table.estimate)
    assert part.log_likelihood == pytest.approx(full.log_likelihood)
    ratio = (part.table.std_error / full.table.std_error).dropna()
    assert len(ratio) > 5 and np.all(np.abs(ratio - 1) < 0.15)
    # more rows than X has: the exact sum
    same = m.summary(X, y, information_rows=10_000)
    np.testing.assert_allclose(same.table.std_error, full.table.std_error)
    with pytest.raises(ValueError, match="information_rows"):
        m.summary(X, y, information_rows=0)
