"""Batched products with a chunk's rows: each start's numbers as alone, for every shape.

MKL rounds a product by its operands' addresses and, for products with one column,
by the batch; before the rows were padded to a common alignment, about a third of
the shapes below gave a start different last bits among nine others than alone.
"""

import itertools

import pytest
import torch

from moekit._core.batch import batched_grams, design_sums, times_design
from moekit._core.data import EMData
from moekit._core.engine import em_threads
from moekit.experts.gaussian import GaussianExperts
from moekit.fitting import batched, lockstep
from moekit.fitting.init import random_resp
from moekit.fitting.model import EMModel
from moekit.gates.softmax import SoftmaxGate

SHAPES = list(itertools.product([2, 3, 5], [1, 2, 3, 5, 12], [97, 150, 301]))


def _alike(f, *stacked, rest=()):
    """Whether f of each start alone equals its slice of f of all ten."""
    together = f(*stacked, *rest)
    return all(
        torch.equal(f(*(t[s : s + 1].clone() for t in stacked), *rest)[0], together[s])
        for s in range(stacked[0].shape[0])
    )


def _data(p, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn((p - 1, c), generator=gen, dtype=torch.float64)
    XT = torch.cat([X, torch.ones((1, c), dtype=torch.float64)])
    return EMData(XT, XT, torch.randn((1, c), generator=gen, dtype=torch.float64))


@pytest.mark.parametrize(("K", "p", "c"), SHAPES)
def test_products_with_the_rows_are_a_start_s_own(K, p, c):
    gen = torch.Generator().manual_seed(K * 1000 + p * 10 + c)
    xt = torch.randn((p, c), generator=gen, dtype=torch.float64)
    coef = torch.randn((10, K, p), generator=gen, dtype=torch.float64)
    w = torch.rand((10, K, c), generator=gen, dtype=torch.float64)
    y = torch.randn((1, c), generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    with torch.no_grad():
        torch.set_num_threads(1)  # as EM runs small passes
        try:
            assert _alike(times_design, coef, rest=(xt,))
            assert _alike(lambda a, x: times_design(a, x, y, alpha=-1.0), coef, rest=(xt,))
            assert _alike(design_sums, w, rest=(xt,))
            chunk = next(_data(p, c).chunks())
            assert _alike(lambda ww: batched_grams(chunk, ww, "e", with_target=True), w)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize(("p", "c"), [(1, 97), (3, 97), (3, 301), (2, 150)])
def test_a_start_is_its_own_among_nine_others_for_odd_rows_and_an_intercept_gate(p, c):
    # an intercept-only gate (a mixture of regressions, X of shape (n, 0) for the gate)
    # and odd row counts: shapes the earlier batched products got wrong
    data = _data(p, c, seed=1)
    model = EMModel(GaussianExperts(3, 1, 1e-6), SoftmaxGate(3))
    model.prepare(data)
    gen = torch.Generator().manual_seed(2)
    starts = [model.init_from_resp(data, random_resp(data, 3, gen)) for _ in range(10)]
    assert batched.can_batch(model, data)

    def run(params):
        return lockstep.iterate(model, params, 30, 1e-10)

    with em_threads(data):
        together = lockstep.drive(model, data, [run(s) for s in starts], serve_many=batched.serve)
        for s in (0, 5, 9):
            alone = lockstep.drive(model, data, [run(starts[s])], serve_many=batched.serve)[0]
            assert alone[2] == together[s][2]
            assert torch.equal(alone[0].expert.coef, together[s][0].expert.coef)
            assert torch.equal(alone[0].gate.coef, together[s][0].gate.coef)
