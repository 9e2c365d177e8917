"""Checks every family's batched starts must pass (the test_lockstep*.py files).

A family offering ``batchable`` computes S starts in one pass and one step
(:mod:`moekit.fitting.batched`). Each start's numbers must be its own: the
batched pass and step equal the single-start ones, and a batched fit ends where
the sequential one does.
"""

import warnings

import pytest
import torch

from moekit.fitting import batched
from moekit.fitting.init import random_resp


def random_starts(model, data, n, seed=0):
    """``n`` starts of ``model`` from random responsibilities (a seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    return [model.init_from_resp(data, random_resp(data, model.n_experts, gen)) for _ in range(n)]


def param_fields(params):
    """Every tensor of a start's parameters, the experts' then the gate's."""
    return [*vars(params.expert).values(), *vars(params.gate).values()]


def assert_pass_and_step_match(model, data, starts, fields=param_fields):
    """The batched E-pass and M-step of ``starts`` equal each start's own, to rounding."""
    alone = [model.e_pass(p, data) for p in starts]
    many = batched.e_pass_many(model, starts, data)
    for a, b in zip(alone, many, strict=True):
        assert b.objective == pytest.approx(a.objective, rel=1e-13, abs=1e-13)
        torch.testing.assert_close(b.nk, a.nk, rtol=1e-12, atol=1e-12)
    steps = [model.m_step(p, r, data) for p, r in zip(starts, alone, strict=True)]
    for a, b in zip(steps, batched.m_step_many(model, starts, many, data), strict=True):
        for x, y in zip(fields(a), fields(b), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-10)


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
