"""Checks every family's batched starts must pass (the test_lockstep*.py files).

A family offering ``batchable`` computes S starts in one pass and one step
(:mod:`moekit.fitting.batched`). Each start's numbers must be its own: the
batched pass and step equal the single-start ones, and a batched fit ends where
the sequential one does.
"""

import warnings

import pytest
import torch

from moekit._core.engine import em_threads
from moekit.fitting import batched, lockstep
from moekit.fitting.init import random_resp


def random_starts(model, data, n, seed=0):
    """``n`` starts of ``model`` from random responsibilities (a seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    return [model.init_from_resp(data, random_resp(data, model.n_experts, gen)) for _ in range(n)]


def param_fields(params):
    """Every tensor of a start's parameters, the experts' then the gate's."""
    return [*vars(params.expert).values(), *vars(params.gate).values()]


def assert_pass_and_step_match(model, data, starts, fields=param_fields, *, objective_tol=1e-13,
                               stats_tol=None, own_tensors=False):  # fmt: skip
    """The batched E-pass and M-step of ``starts`` equal each start's own, to rounding.

    ``stats_tol``: (rtol, atol) to hold the experts' statistics to as well;
    ``own_tensors``: each start's stepped parameters are tensors of its own, not views
    of the batch's.
    """
    alone = [model.e_pass(p, data) for p in starts]
    many = batched.e_pass_many(model, starts, data)
    for a, b in zip(alone, many, strict=True):
        assert b.objective == pytest.approx(a.objective, rel=objective_tol, abs=objective_tol)
        torch.testing.assert_close(b.nk, a.nk, rtol=1e-12, atol=1e-12)
        if stats_tol is not None:
            for x, y in zip(a.expert_stats, b.expert_stats, strict=True):
                torch.testing.assert_close(y, x, rtol=stats_tol[0], atol=stats_tol[1])
    steps = [model.m_step(p, r, data) for p, r in zip(starts, alone, strict=True)]
    for a, b in zip(steps, batched.m_step_many(model, starts, many, data), strict=True):
        for x, y in zip(fields(a), fields(b), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-10)
            if own_tensors:
                assert y._base is None


def fit_both(monkeypatch, make):
    """``make()`` with the batched path, then with every start run alone."""
    fits = {}
    for path in ("batched", "sequential"):
        if path == "sequential":
            monkeypatch.setattr(batched, "can_batch", lambda model, data: False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[path] = make()
    return fits["batched"], fits["sequential"]


def assert_alone_as_among_others(model, data, starts, fields=param_fields, checked=(0, 3, 9)):
    """Starts ``checked`` of ``starts`` (ten, say) each run 40 iterations alone end
    bitwise where they end among the others (histories and parameters), on one
    thread as EM runs small passes (a parallel reduction splits its rows by the size
    of the whole batch); SQUAREM cycles and safeguard halvings included."""

    def run(p):
        return lockstep.iterate(model, p, 40, 1e-10)

    with em_threads(data):
        together = lockstep.drive(model, data, [run(p) for p in starts], serve_many=batched.serve)
        for s in checked:
            alone = lockstep.drive(model, data, [run(starts[s])], serve_many=batched.serve)[0]
            assert alone[2] == together[s][2]  # the objective histories, exactly
            for a, b in zip(fields(alone[0]), fields(together[s][0]), strict=True):
                assert torch.equal(a, b)
    # the runs differ from one another: the batch really held different runs
    assert len({r[2][-1] for r in together}) > 1
