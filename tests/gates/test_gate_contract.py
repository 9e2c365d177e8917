"""Every gate of the package implements the contract of ``moekit.gates.base``.

The gates are discovered (every class of ``moekit.gates`` with ``log_weights`` and
``m_step``), so a new gate needs a line in ``GATES``. Each implements
:class:`GateFamily` with compatible signatures and every capability protocol wholly
or not at all; cheap behavioural checks follow: a fit of two EM iterations that does
not decrease the objective, normalised weights, ``select`` and ``shift`` as a split
uses them, the free and reported parametrisations round trip to the same weights,
model-file shapes and checks, and the nested embedding.
"""

from __future__ import annotations

import itertools
import math
import re

import contract_checks as checks
import pytest
import torch

import moekit.gates
from moekit._core.data import Chunk, EMData
from moekit._core.reporting import Scaling
from moekit.experts.gaussian import GaussianExperts
from moekit.fitting.model import EMModel, resized_family
from moekit.gates import base
from moekit.gates.constant import ConstantGate
from moekit.gates.dirichlet import DirichletGate
from moekit.gates.mlp import MLPGate
from moekit.gates.softmax import SoftmaxGate
from moekit.gates.tree import TreeGate

discover, has_any, protocol_problems = checks.discover, checks.has_any, checks.protocol_problems

N, P = 240, 3  # rows, design columns (two features and the intercept)

GATES = {
    ConstantGate: [lambda: ConstantGate(3)],
    SoftmaxGate: [lambda: SoftmaxGate(3), lambda: SoftmaxGate(3, solver="bohning")],
    TreeGate: [lambda: TreeGate(1, 3), lambda: TreeGate(2, 2)],
    MLPGate: [lambda: MLPGate(3, options={"hidden": 4, "steps": 3})],
    DirichletGate: [lambda: DirichletGate(3, concentration=0.5)],
}
CASES = [
    pytest.param(make, id=f"{cls.__name__}-{i}")
    for cls, makers in GATES.items()
    for i, make in enumerate(makers)
]
CAPABILITIES = [base.StoredGate, base.DifferentiableGate, base.ReportedGate, base.NestedGate,
                base.ShapedGate]  # fmt: skip


def _data(seed: int = 0) -> EMData:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P - 1, N, generator=g, dtype=torch.float64)
    XT = torch.cat([X, torch.ones(1, N, dtype=torch.float64)])
    y = torch.where(X[0] > 0, 1.0 + X[1], -1.0 - 0.5 * X[1]) + torch.where(X[1] > 0, 2.0, 0.0)
    y = y + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return EMData(XT, XT, y.unsqueeze(0))


def _fitted(gate, data: EMData, iterations: int = 2):
    """The gate's parameters after a start from random responsibilities and a few EM steps."""
    model = EMModel(GaussianExperts(gate.n_experts, 1, 1e-6), gate)
    model.prepare(data)
    g = torch.Generator().manual_seed(1)
    e = -torch.log(torch.rand(gate.n_experts, data.n, generator=g, dtype=torch.float64))
    params = model.init_from_resp(data, e / e.sum(0))
    params, _, history, _ = model.iterate(params, data, iterations, 0.0, accelerate=False)
    return params.gate, history


def _normalised(logw: torch.Tensor) -> None:
    torch.testing.assert_close(torch.logsumexp(logw, 0), torch.zeros_like(logw[0]))


# ---------------------------------------------------------------------------- tests
def test_every_gate_is_listed():
    found = discover(moekit.gates, "log_weights", "m_step")
    assert found == set(GATES), f"gates without a line in GATES: {found - set(GATES)}"


@pytest.mark.parametrize("make", CASES)
def test_gate_implements_the_protocol(make):
    gate = make()
    assert protocol_problems(gate, base.GateFamily) == []
    for proto in CAPABILITIES:  # a capability wholly, or not at all
        if has_any(gate, proto):
            assert protocol_problems(gate, proto) == [], proto.__name__
    for name, kind in (("report_name", str), ("supports_balance", bool)):
        if hasattr(gate, name):
            assert isinstance(getattr(gate, name), kind)
    if hasattr(gate, "from_report"):
        assert not protocol_problems(gate, base.DifferentiableGate)
    assert base.Gate is base.GateFamily


@pytest.mark.parametrize("make", CASES)
def test_em_steps_weights_select_and_shift(make):
    gate, data = make(), _data()
    params, history = _fitted(gate, data)
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(history)), history
    K = gate.n_experts
    logw = gate.log_weights(params, data.XgT)
    assert logw.shape == (K, N)
    _normalised(logw)
    assert gate.log_prob(params, Chunk(0, data.n, data)).shape == (K, N)
    assert isinstance(gate.n_parameters(params), int) and math.isfinite(gate.log_prior(params))
    same = gate.select(params, torch.arange(K))
    torch.testing.assert_close(gate.log_weights(same, data.XgT), logw)
    perm = torch.arange(K).flip(0)
    if hasattr(gate, "representable_order"):
        perm = gate.representable_order(perm)
    torch.testing.assert_close(gate.log_weights(gate.select(params, perm), data.XgT), logw[perm])
    if not getattr(gate, "resizable", True):
        return
    # a split as the starts make it: expert 0 duplicated, the two halves at half its weight
    idx = torch.tensor([*range(K), 0])
    delta = torch.zeros(K + 1, dtype=torch.float64)
    delta[[0, K]] = -math.log(2.0)
    big = resized_family(gate, K + 1)  # as the loop resizes families
    split = big.shift(big.select(params, idx), delta)
    logs = big.log_weights(split, data.XgT)
    _normalised(logs)
    torch.testing.assert_close(logs[[0, K]], (logw[0] - math.log(2.0)).expand(2, N))
    torch.testing.assert_close(logs[1:K], logw[1:])


@pytest.mark.parametrize("make", CASES)
def test_free_and_reported_parametrisations_round_trip(make):
    gate, data = make(), _data()
    if not hasattr(gate, "to_free"):
        pytest.skip("no differentiable view")
    params, _ = _fitted(gate, data)
    logw = gate.log_weights(params, data.XgT)
    free = gate.to_free(params)
    torch.testing.assert_close(gate.log_weights_free(free, data.XgT), logw)
    torch.testing.assert_close(gate.log_weights(gate.from_free(free), data.XgT), logw)
    assert gate.log_prior_free(free).ndim == 0
    if hasattr(gate, "report"):
        one = torch.ones(1, dtype=torch.float64)
        scaling = Scaling(torch.tensor([0.5, -1.0], dtype=torch.float64),
                          torch.tensor([2.0, 0.7], dtype=torch.float64), 0 * one, one,
                          ["a", "b"], ["y"])  # fmt: skip
        report = gate.report(params, scaling, reference=1)
        assert len(report.labels) == report.flat().numel() == len(report.blocks)
        free = gate.from_report(report.values, scaling, report.fixed)
        torch.testing.assert_close(gate.log_weights_free(free, data.XgT), logw)


@pytest.mark.parametrize("make", CASES)
def test_model_file_shapes_and_checks(make):
    gate, data = make(), _data()
    params, _ = _fitted(gate, data)
    shapes = gate.param_shapes(P)
    assert isinstance(params, gate.params_type)
    assert {k: tuple(v.shape) for k, v in vars(params).items()} == shapes
    gate.check_params(params, prefix="gate.")
    for name in shapes:
        bad = gate.params_type(**vars(params))
        t = getattr(bad, name).clone(memory_format=torch.contiguous_format)
        t.view(-1)[0] = float("nan")
        setattr(bad, name, t)
        with pytest.raises(ValueError, match=re.escape(repr("gate." + name))):
            gate.check_params(bad, prefix="gate.")


@pytest.mark.parametrize("make", CASES)
def test_nested_gate_embeds_at_the_same_weights(make):
    gate, data = make(), _data()
    simpler = gate.simpler() if hasattr(gate, "simpler") else None
    if simpler is None:
        pytest.skip("contains no simpler gate")
    small, _ = _fitted(simpler, data)
    gate.prepare(data)
    logw = gate.log_weights(gate.embed(small, data), data.XgT)
    logw_small = simpler.log_weights(small, data.XgT)
    if simpler.n_experts == gate.n_experts:
        torch.testing.assert_close(logw, logw_small)
        return
    # fewer experts: each of the simpler gate's weights is shared among its copies
    origin = gate.expert_origin()
    assert origin.shape == (gate.n_experts,)
    for j in range(simpler.n_experts):
        torch.testing.assert_close(torch.logsumexp(logw[origin == j], 0), logw_small[j])
