"""The E-pass and the M-step of S starts of one model as one set of tensor operations.

On small data an EM iteration is a few dozen tensor operations of microseconds
each, almost all overhead; S starts computed together cost about what one costs.
The families say whether they can (``batchable``, declared by the family's class
itself, so that a subclass that changes the maths is not batched by inheritance)
and then offer, with the S starts' parameters stacked on a leading axis
(:mod:`moekit._core.batch`):

- ``log_prob_many(params, chunk)``: log p_k(y | x) or log g_k(x), shape (S, K, c);
- ``chunk_stats_many(params, chunk, resp)``: their statistics for responsibilities
  (S, K, c), every tensor stacked (S, ...) with each start's slice in the layout
  of ``chunk_stats``;
- ``m_step_many(params, stats, data)``: the stacked new parameters.

A family must have no coupling across experts in these (a tied variance would
have one) and compute every start with per-start shapes (batched products), so
that a start's numbers do not depend on its batch mates. The pass itself is the
same as :meth:`EMModel.e_pass`: one log-sum-exp over each start's K rows gives the
responsibilities and the row log-likelihoods together.
"""

from __future__ import annotations

import torch

from moekit._core.batch import stack_params, unstack_params
from moekit._core.data import EMData
from moekit.fitting.lockstep import E_PASS
from moekit.fitting.model import EMModel, Params, PassResult, posterior


def _declares(family) -> bool:
    return bool(type(family).__dict__.get("batchable", False))


def can_batch(model: EMModel, data: EMData) -> bool:
    """Whether the starts of ``model`` on ``data`` can share their passes and steps.

    Both families must declare it; data-parallel data, frozen parts and the gate's
    balance penalty keep the one-start path.
    """
    return (
        _declares(model.expert)
        and _declares(model.gate)
        and data.comm is None
        and not model.needs_resp
        and not model.frozen_experts
        and not model.gate_frozen
        and not model.gate_balance
    )


def _split(stats, S: int) -> list:
    """Stacked statistics (a tensor, a tuple of them, or None) -> S per-start ones."""
    if stats is None:
        return [None] * S
    if isinstance(stats, tuple):
        parts = [_split(t, S) for t in stats]
        return [tuple(p[s] for p in parts) for s in range(S)]
    return list(stats.unbind(0))


def _stack(parts: list):
    """The inverse of :func:`_split`."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_stack([p[i] for p in parts]) for i in range(len(first)))
    return torch.stack(parts)


def _add(acc, new):
    if acc is None or new is None:
        return new
    if isinstance(new, tuple):
        return tuple(_add(a, b) for a, b in zip(acc, new, strict=True))
    return acc + new


def e_pass_many(model: EMModel, params: list[Params], data: EMData) -> list[PassResult]:
    """:meth:`EMModel.e_pass` (with statistics) at each of S parameters, in one pass."""
    S = len(params)
    expert, gate = model.expert, model.gate
    ep = stack_params([p.expert for p in params])
    gp = stack_params([p.gate for p in params])
    total = nk = es = gs = None
    for chunk in data.chunks(model.chunk_size):
        joint = expert.log_prob_many(ep, chunk)  # (S, K, c)
        joint.add_(gate.log_prob_many(gp, chunk))
        resp, row_ll = posterior(joint, 1)  # (S, K, c), (S, 1, c)
        if chunk.weight is not None:
            row_ll.mul_(chunk.weight)
            resp.mul_(chunk.weight)
        total = _add(total, row_ll.sum((1, 2)))  # (S,)
        nk = _add(nk, resp.sum(2))  # (S, K)
        es = _add(es, expert.chunk_stats_many(ep, chunk, resp))
        gs = _add(gs, gate.chunk_stats_many(gp, chunk, resp))
    n = data.w_total
    e_prior = _log_priors(expert, ep, [p.expert for p in params])
    g_prior = _log_priors(gate, gp, [p.gate for p in params])
    out = []
    for s, (e, g, t) in enumerate(zip(_split(es, S), _split(gs, S), total.tolist(), strict=True)):
        loglik = t / n
        prior = e_prior[s] + g_prior[s]
        out.append(PassResult(loglik + prior / n, loglik, e, g, None, nk[s]))
    return out


def _log_priors(family, stacked, each: list) -> list[float]:
    """Each start's log-prior: in one go where the family offers ``log_prior_many``."""
    many = getattr(family, "log_prior_many", None)
    if many is None:
        return [family.log_prior(p) for p in each]
    return many(stacked).tolist()


def m_step_many(
    model: EMModel, params: list[Params], results: list[PassResult], data: EMData
) -> list[Params]:
    """:meth:`EMModel.m_step` of each of S parameters with its pass, in one step."""
    ep = stack_params([p.expert for p in params])
    gp = stack_params([p.gate for p in params])
    new_e = model.expert.m_step_many(ep, _stack([r.expert_stats for r in results]), data)
    new_g = model.gate.m_step_many(gp, _stack([r.gate_stats for r in results]), data)
    return [Params(e, g) for e, g in zip(unstack_params(new_e), unstack_params(new_g),
                                         strict=True)]  # fmt: skip


def serve(model: EMModel, data: EMData, kind: str, requests: list[tuple]) -> list:
    """Answers to the requests of :mod:`moekit.fitting.lockstep` runs, all of one kind."""
    if kind == E_PASS:
        return e_pass_many(model, [r[1] for r in requests], data)
    return m_step_many(model, [r[1] for r in requests], [r[2] for r in requests], data)
