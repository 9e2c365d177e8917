"""The observed information of a mixture of experts from analytic per-row derivatives.

Row i's log-likelihood is l_i = log sum_k exp(a_ik), a_ik = log g_k(x_i) +
log p_k(y_i | x_i). Its Hessian (Louis' identity: the expected complete-data
Hessian less the conditional covariance of the complete-data score) is

.. math::  \\nabla^2 l_i = \\sum_k r_{ik} \\big(\\nabla^2 a_{ik}
           + \\nabla a_{ik} \\nabla a_{ik}^\\top\\big) - \\bar s_i \\bar s_i^\\top,
           \\qquad \\bar s_i = \\sum_k r_{ik} \\nabla a_{ik},

with r_ik the posterior responsibilities. Each family's log-term depends on its
parameters only through a few *local* parameters per row (linear predictors
eta = beta^T z_i, and scalars), so the gradient of a_ik is the local derivative
times z_i and the chain rule has no second-order term: with W_i the Hessian of l_i
in every local parameter of every expert and of the gate (a small G x G matrix per
row, ``row_hessian``), the block of the total Hessian between local parameters A
and B is the weighted Gram matrix

.. math::  H_{AB} = \\sum_i w_i\\, W_{i,AB}\\, z_{A,i} z_{B,i}^\\top,

with z the expert's or the gate's standardised design for a linear predictor, and
the number 1 for a scalar; w_i is a row weight (1 by default; a frequency weight
multiplies the row's log-likelihood, hence its Hessian). The Grams of every pair of
linear predictors come from one matrix product per chunk of rows with the packed
products the EM loop uses (:meth:`moekit._core.data.Chunk.weighted_grams`), so the
information costs about one EM iteration per (G_linear + 1) G_linear / 2 weighted
Grams and never holds an (n, P, P) tensor. Each family maps its reported parameters
theta affinely onto its local ones phi (``local_parameters``), so the Hessian in the
reported coordinates is exactly J^T H_phi J with the constant J = d phi / d theta.
"""

from __future__ import annotations

import torch

from moekit._core.derivatives import LocalDerivatives
from moekit._core.engine import em_threads

INFORMATION_BUDGET = 2**22
"""Numbers a chunk's per-row Hessians W (G x G per row) may hold; wider models get
shorter chunks."""

_ORDER = {"e": 0, "g": 1, "1": 2}


def has_analytic_information(expert, gate, K: int) -> bool:
    """Whether the families give analytic derivatives (else: autograd)."""
    return hasattr(expert, "local_derivatives") and (K == 1 or hasattr(gate, "local_derivatives"))


def row_hessian(r: torch.Tensor, de: LocalDerivatives, dg: LocalDerivatives | None) -> torch.Tensor:
    """Per-row Hessians of l_i = log sum_k exp(a_ik) in every local parameter, (G, G, c).

    Parameters
    ----------
    r : Tensor of shape (K, c)
        Posterior responsibilities.
    de : LocalDerivatives
        The experts': d1 (K, L, c), d2 (K, L, L, c); expert k's depend on its own only.
    dg : LocalDerivatives or None
        The gate's: d1 (K, Lg, c), d2 (K or 1, Lg, Lg, c); every component's log-term
        depends on all of them. None for a single expert.

    Returns
    -------
    Tensor of shape (K L + Lg, K L + Lg, c)
        Experts' local parameters first (expert-major), then the gate's.
    """
    K, L, c = de.d1.shape
    d1 = de.d1.expand(K, L, c)
    rd = r.unsqueeze(1) * d1  # r_ik d a_ik, (K, L, c)
    KL = K * L
    Lg = 0 if dg is None else dg.d1.shape[1]
    W = r.new_empty((KL + Lg, KL + Lg, c))
    # experts: sum_k r_k (d2_k + d1_k d1_k^T) on expert k's own block, less s_bar s_bar^T
    W[:KL, :KL] = rd.reshape(KL, 1, c) * rd.reshape(1, KL, c)
    W[:KL, :KL].neg_()
    blocks = W[:KL, :KL].view(K, L, K, L, c)
    for k in range(K):
        blocks[k, :, k] += r[k] * (de.d2[k] + d1[k].unsqueeze(1) * d1[k].unsqueeze(0))
    if dg is None:
        return W
    g1 = dg.d1.expand(K, Lg, c)
    g_bar = (r.unsqueeze(1) * g1).sum(0)  # (Lg, c)
    # expert k with the gate: r_k d1_k (d1g_k - g_bar)^T
    eg = (rd.unsqueeze(2) * (g1.unsqueeze(1) - g_bar)).reshape(KL, Lg, c)
    W[:KL, KL:] = eg
    W[KL:, :KL] = eg.transpose(0, 1)
    gg = (r.view(K, 1, 1, c) * (dg.d2 + g1.unsqueeze(2) * g1.unsqueeze(1))).sum(0)
    W[KL:, KL:] = gg - g_bar.unsqueeze(1) * g_bar.unsqueeze(0)
    return W


class _Layout:
    """The local parameters phi: one group per linear predictor or scalar, in the order
    of ``row_hessian`` (experts' groups expert-major, then the gate's), each with its
    design ('e' expert, 'g' gate, '1' a scalar) and its slice of phi; and the pairs of
    groups whose Hessian blocks are formed alike (``jobs``)."""

    def __init__(self, K, L, n_linear, Lg, g_linear, pe, pg, shared) -> None:
        kinds = [("e" if l < n_linear else "1") for _ in range(K) for l in range(L)]
        kinds += ["g" if l < g_linear else "1" for l in range(Lg)]
        sizes = {"e": pe, "g": pg, "1": 1}
        self.kinds, self.offsets, at = kinds, [], 0
        for kind in kinds:
            self.offsets.append(at)
            at += sizes[kind]
        self.size, self.sizes = at, [sizes[k] for k in kinds]
        # the gate's design is the experts' where they share it: one Gram for both
        design = [("e" if (k == "g" and shared) else k) for k in kinds]
        jobs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        for a in range(len(kinds)):
            for b in range(a, len(kinds)):
                ka, kb, aa, bb = design[a], design[b], a, b
                if _ORDER[ka] > _ORDER[kb]:
                    ka, kb, aa, bb = kb, ka, b, a
                rows = jobs.setdefault((ka, kb), ([], []))
                rows[0].append(aa)
                rows[1].append(bb)
        self.jobs = {key: (torch.tensor(a), torch.tensor(b)) for key, (a, b) in jobs.items()}


def _job_sums(kind: tuple[str, str], w: torch.Tensor, chunk) -> torch.Tensor:
    """The chunk's sums of one kind of block, one per weight row of w (T, c)."""
    if kind == ("1", "1"):
        return w.sum(1)  # (T,)
    if kind[1] == "1":
        return w @ (chunk.XeT if kind[0] == "e" else chunk.XgT).T  # (T, p)
    if kind[0] == kind[1]:
        return chunk.weighted_grams(w, kind[0])  # packed (f, T) or (T, p, p)
    # expert design with a gate design of its own: one product per weight
    return torch.stack([(chunk.XeT * w[t]) @ chunk.XgT.T for t in range(w.shape[0])])


def analytic_hessian(lik, sample_weight: torch.Tensor | None = None):
    """Hessian of the total log-likelihood in the reported parameters, and its value.

    Parameters
    ----------
    lik : ReportedLikelihood
        The fitted model, its data and its report (:mod:`moekit.estimators.inference`).
    sample_weight : Tensor of shape (n,), optional
        Frequency weights of the rows (each row's log-likelihood times w_i).

    Returns
    -------
    hess : Tensor of shape (P, P)
    loglik : float
        sum_i w_i log p(y_i | x_i) in the data's units.
    """
    from moekit._core.data import unpack_grams

    model, data, K = lik.model, lik.data, lik.K
    expert, gate = model._expert_family, model._gate_family
    params = model._params
    reference = int(lik.report.fixed.get("gate_reference", 0))
    jac = _local_jacobian(lik)  # (Phi, P)
    layout = _Layout(K, *_local_shapes(lik), data.XeT.shape[0], data.XgT.shape[0],
                     data.shared_design)  # fmt: skip
    sums: dict[tuple[str, str], torch.Tensor] = {}
    total = data.XeT.new_zeros(())
    with em_threads(data), torch.no_grad():
        for chunk in data.chunks(_chunk_rows(data, len(layout.kinds))):
            de = expert.local_derivatives(params.expert, chunk, lik._escale)
            a = expert.log_prob(params.expert, chunk)  # (K, c), a fresh tensor
            dg = None
            if K > 1:
                dg = gate.local_derivatives(params.gate, chunk, reference)
                a = a + gate.log_weights(params.gate, chunk.XgT)
            lse = torch.logsumexp(a, 0)
            r = torch.exp(a - lse)
            W = row_hessian(r, de, dg)
            if sample_weight is not None:
                w = sample_weight[chunk.start : chunk.stop]
                W.mul_(w)
                lse = lse * w
            total += lse.sum()
            for kind, (ia, ib) in layout.jobs.items():
                part = _job_sums(kind, W[ia, ib], chunk)
                sums[kind] = part if kind not in sums else sums[kind] + part
    hess = data.XeT.new_zeros((layout.size, layout.size))
    for kind, (ia, ib) in layout.jobs.items():
        blocks = sums[kind]
        if kind[0] == kind[1] and kind[0] != "1":
            blocks = unpack_grams(blocks, data.XeT.shape[0] if kind[0] == "e" else
                                  data.XgT.shape[0])[0]  # fmt: skip
        for t, (a, b) in enumerate(zip(ia.tolist(), ib.tolist(), strict=True)):
            sa = slice(layout.offsets[a], layout.offsets[a] + layout.sizes[a])
            sb = slice(layout.offsets[b], layout.offsets[b] + layout.sizes[b])
            block = blocks[t].reshape(layout.sizes[a], layout.sizes[b])
            hess[sa, sb] = block
            hess[sb, sa] = block.T
    n_rows = data.n if sample_weight is None else float(sample_weight.sum())
    hess = jac.T @ hess @ jac
    return (hess + hess.T) / 2, float(total) + lik._jacobian * n_rows


def _chunk_rows(data, groups: int) -> int:
    """Rows per chunk: the EM loop's, fewer where the per-row Hessians are large."""
    return max(1024, min(data.chunk_rows(), INFORMATION_BUDGET // (groups * groups)))


def _local_shapes(lik) -> tuple[int, int, int, int]:
    """Local parameters per expert and how many are linear; the gate's (L, Ll, Lg, Lgl)."""
    fixed, values = lik.report.fixed, lik.report.values
    coef, scalars = lik.model._expert_family.local_parameters(values, lik._escale, fixed)
    L, n_linear = coef.shape[1] + scalars.shape[1], coef.shape[1]
    if lik.K == 1:
        return L, n_linear, 0, 0
    gcoef, gscal = lik.model._gate_family.local_parameters(values, lik._gscale, fixed)
    return L, n_linear, gcoef.shape[1] + gscal.shape[1], gcoef.shape[1]


def _local_jacobian(lik) -> torch.Tensor:
    """J = d phi / d theta (Phi, P), phi the local parameters in the layout's order.

    phi is affine in theta (the families' ``local_parameters``), so J is constant;
    it is taken by reverse-mode autograd through those maps, P being small.
    """
    expert, gate = lik.model._expert_family, lik.model._gate_family
    fixed = lik.report.fixed

    def phi(theta: torch.Tensor) -> torch.Tensor:
        values = lik.report.unflatten(theta)
        coef, scalars = expert.local_parameters(values, lik._escale, fixed)
        parts = [torch.cat([coef.reshape(coef.shape[0], -1), scalars], 1).reshape(-1)]
        if lik.K > 1:
            gcoef, gscal = gate.local_parameters(values, lik._gscale, fixed)
            parts.append(torch.cat([gcoef.reshape(1, -1), gscal], 1).reshape(-1))
        return torch.cat(parts)

    return torch.autograd.functional.jacobian(phi, lik.theta.detach())
