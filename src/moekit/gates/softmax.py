"""The softmax (multinomial-logit) gate: g_k(x) = softmax(V x)_k.

V has one row per expert, all free (the symmetric parametrisation): adding the
same vector to every row leaves g unchanged, and the L2 penalty on the slopes
picks the solution whose slopes sum to zero over experts, so that the gate and its
penalty are unchanged when experts are renumbered. The M-step maximises the
gate's part of the EM objective on the soft targets r_ik,

.. math::  Q_g(V) = \\sum_i \\sum_k r_{ik} \\log g_k(x_i; V)
                   - \\frac{\\alpha}{2} \\lVert V_{\\text{slopes}} \\rVert^2,

a concave function. With theta = vec(V), its gradient is sum_i (r_i - g_i) (x) x_i
and its negative Hessian

.. math::  A = \\sum_i (\\operatorname{diag} g_i - g_i g_i^T) \\otimes x_i x_i^T + \\alpha P,

which is singular along the intercepts' common shift; the step is the
minimum-norm solution (the gradient has no component along that direction, since
sum_k (r_ik - g_ik) = 0).

Two steps are offered. **Newton**: theta += A^{-1} grad, using g at the current V,
which the E-step has just computed, so the gradient and the Hessian come from the
same pass over the data. The Newton step is not guaranteed to increase Q_g, so
the loop checks the likelihood and shortens it when needed (rarely). **Bohning**:
A is replaced by the fixed bound B = 1/2 (I - 11^T / K) (x) X^T X + alpha P
(Bohning, 1992), which dominates the Hessian everywhere; the step then always
increases Q_g (a minorise-maximise step) and costs O(n p K) per iteration instead
of O(n (p K)^2). ``solver="auto"`` uses Newton while (K - 1) p is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.batch import batched_grams, design_sums, flat_grams, times_design
from moekit._core.data import Chunk, EMData, unpack_grams
from moekit._core.linalg import even_system, solve_psd
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite
from moekit.gates.constant import ConstantGate, ConstantGateParams, multinomial_derivatives

NEWTON_MAX_PARAMS = 256
"""``solver="auto"`` uses Newton up to this many gate parameters, K p."""


@dataclass
class SoftmaxGateParams:
    """coef of shape (K, p): one row per expert, the last column the intercept."""

    coef: torch.Tensor


def log_softmax_rows(logits: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax over axis ``dim`` of the logits ((K, c) by default), and the probabilities.

    Written with K-row elementwise operations, which on the CPU are several times
    faster than ``torch.log_softmax(dim=0)`` for a handful of rows. The tree gate
    takes it over the children of every node (``dim=1``), so that a tree of depth 1
    computes exactly what this gate computes.
    """
    top = logits.amax(dim, keepdim=True)
    shifted = logits - top
    e = torch.exp(shifted)
    s = e.sum(dim, keepdim=True)
    return shifted.sub_(torch.log(s)), e.div_(s)


def bohning_bound(gram: torch.Tensor, alpha: float, pen: torch.Tensor, K: int) -> torch.Tensor:
    """Bohning's bound 1/2 (I - 11^T / K) (x) gram + alpha diag(P), batched over grams.

    Parameters
    ----------
    gram : Tensor of shape (..., p, p)
        sum_i w_i x_i x_i^T (w_i = 1 for the softmax gate, R_i(n) for a tree's node n).
    alpha : float
    pen : Tensor of shape (p,)
        P's diagonal: 1 for the slopes, 0 for the intercept.
    K : int
        Classes of the softmax (experts, or a node's children).

    Returns
    -------
    Tensor of shape (..., K p, K p)
    """
    a = 0.5 * (torch.eye(K, dtype=gram.dtype, device=gram.device) - 1.0 / K)
    kron = torch.einsum("kl,...pq->...kplq", a, gram)
    kron = kron.reshape(*gram.shape[:-2], K * gram.shape[-1], K * gram.shape[-1])
    return kron + alpha * torch.diag(pen.repeat(K))


def bound_step(evals: torch.Tensor, evecs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """B^+ g for B = evecs diag(evals) evecs^T, batched: the Bohning step.

    Eigenvalues below 1e-12 of the largest count as zero (the minimum-norm step:
    B is singular along the intercepts' common shift, where g has no part).

    Parameters
    ----------
    evals : Tensor of shape (..., q)
    evecs : Tensor of shape (..., q, q)
    g : Tensor of shape (..., q)
    """
    inv = torch.where(
        evals > 1e-12 * evals.amax(-1, keepdim=True), 1.0 / evals, torch.zeros_like(evals)
    )
    proj = (evecs.transpose(-1, -2) @ g.unsqueeze(-1)).squeeze(-1)
    return (evecs @ (inv * proj).unsqueeze(-1)).squeeze(-1)


class SoftmaxGate:
    """Multinomial-logit gate fitted by Newton or Bohning steps (see module docstring).

    Parameters
    ----------
    n_experts : int
    alpha : float
        L2 penalty on the slopes (not the intercepts), on the scale of the summed
        log-likelihood. Keeps V finite when the experts' regions are separable.
    solver : {'auto', 'newton', 'bohning'}
    """

    supports_balance = True  # its statistics are linear in the soft targets (EMModel)

    report_name = "softmax"
    # with one expert its one row of coefficients stays at 0 (the M-step leaves it),
    # so the weight is 1 and the log-prior 0: a one-expert fit is the expert's fit
    # alone, as under the constant gate (fitting.starts shares it between them)
    constant_with_one_expert = True
    needs_resp = False
    params_type = SoftmaxGateParams

    def __init__(self, n_experts: int, alpha: float = 1e-3, solver: str = "auto") -> None:
        self.n_experts = n_experts
        self.alpha = alpha
        self.solver = solver
        self._use_newton = solver == "newton"
        self._pen = None

    @property
    def monotone(self) -> bool:
        return not self._use_newton

    def _penalty_mask(self, p: int, like: torch.Tensor) -> torch.Tensor:
        pen = like.new_ones(p)
        pen[-1] = 0.0  # no penalty on the intercept
        return pen

    def prepare(self, data: EMData) -> None:
        p, K = data.XgT.shape[0], self.n_experts
        self._use_newton = self.solver == "newton" or (
            self.solver == "auto" and K * p <= NEWTON_MAX_PARAMS
        )
        self._pen = self._penalty_mask(p, data.XgT)
        # per-fit constants of the Newton system (see m_step), built once: on small
        # data an EM step is a few dozen small tensor operations, and these were a
        # tenth of the gate's
        rows, cols = torch.triu_indices(K, K, device=data.XgT.device)
        u = data.XgT.new_zeros((K, p))
        u[:, -1] = K**-0.5  # the intercepts' common shift
        u = u.reshape(-1)
        self._newton_consts = (rows, cols, self.alpha * torch.diag(self._pen.repeat(K))
                               + torch.outer(u, u))  # fmt: skip
        if not self._use_newton and K > 1:
            # Bohning's bound B = 1/2 (I - 11^T/K) (x) X^T X: fixed for the whole fit
            xw = data.XgT if data.weight is None else data.XgT * data.weight  # row weights
            gram = data.reduce(xw @ data.XgT.T)  # (p, p), over every process's rows
            bound = bohning_bound(gram, self.alpha, self._pen, K)
            self._bound_evals, self._bound_evecs = torch.linalg.eigh(bound)

    def init_params(self, data: EMData) -> SoftmaxGateParams:
        p = data.XgT.shape[0]
        return SoftmaxGateParams(data.XgT.new_zeros((self.n_experts, p)))

    # ------------------------------------------------------------ E-step
    def log_prob(self, params: SoftmaxGateParams, chunk: Chunk) -> torch.Tensor:
        logg, g = log_softmax_rows(params.coef @ chunk.XgT)  # (K, c)
        chunk.scratch["gate_prob"] = g
        return logg

    def log_weights(self, params: SoftmaxGateParams, XgT: torch.Tensor) -> torch.Tensor:
        return log_softmax_rows(params.coef @ XgT)[0]

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params, chunk: Chunk, resp: torch.Tensor):
        g = chunk.scratch["gate_prob"]  # (K, c)
        xt = chunk.XgT
        # with row weights w_i (resp already carries them): sum_i (r_ik - w_i g_ik) x_i
        grad = (resp - (g if chunk.weight is None else g * chunk.weight)) @ xt.T  # (K, p)
        if not self._use_newton:
            return grad, None
        K, c = self.n_experts, xt.shape[1]
        # weights g_k (delta_kl - g_l) for the pairs k <= l: (T, c)
        T = K * (K + 1) // 2
        # the buffer may be larger (a fit with more experts made it): take T rows
        w = chunk.data.workspace("gate_hess_w", T, c)[:T, :c]
        t = 0
        for k in range(K):
            torch.mul(g[k : k + 1], g[k:], out=w[t : t + K - k]).neg_()
            w[t].add_(g[k])
            t += K - k
        if chunk.weight is not None:
            w.mul_(chunk.weight)
        # narrow designs: one product with the row products the experts share
        return grad, chunk.weighted_grams(w, "g")

    def m_step(self, params, stats, data: EMData, resp=None) -> SoftmaxGateParams:
        K = self.n_experts
        if params is None:
            params = self.init_params(data)
        if K == 1:
            return params
        grad, hess = stats
        V = params.coef  # (K, p)
        p = V.shape[1]
        pen = self._pen
        g = (grad - self.alpha * V * pen).reshape(-1)  # gradient of Q_g, K p
        if self._use_newton:
            blocks = unpack_grams(hess, p)[0]  # (T, p, p)
            rows, cols, ridge = self._newton_consts
            A = V.new_zeros((K, K, p, p))
            A[rows, cols] = blocks
            A[cols, rows] = blocks
            # A is singular along the intercepts' common shift u, where g has no part:
            # A + u u^T (in ridge) is definite where the data determine V, and its
            # solution is then the minimum-norm one, by Cholesky; the eigen-solve is
            # the fallback where it is not
            A = A.transpose(1, 2).reshape(K * p, K * p) + ridge
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                step = torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
            else:
                step = solve_psd(A, g.unsqueeze(1)).squeeze(1)
        else:
            step = bound_step(self._bound_evals, self._bound_evecs, g)
        return SoftmaxGateParams(V + step.reshape(K, p))

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, p)
    batchable = True

    def log_prob_many(self, params: SoftmaxGateParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        logits = times_design(params.coef, chunk.XgT)
        logg, chunk.scratch["gate_prob_many"] = log_softmax_rows(logits, dim=1)
        return logg

    def chunk_stats_many(self, params, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        g = chunk.scratch["gate_prob_many"]  # (S, K, c)
        S, K, c = g.shape
        xt = chunk.XgT
        gw = g if chunk.weight is None else g * chunk.weight
        grad = design_sums(resp - gw, xt)  # (S, K, p)
        if not self._use_newton:
            return grad, None
        w = g.new_empty((S, K * (K + 1) // 2, c))  # g_k (delta_kl - g_l), pairs k <= l
        t = 0
        for k in range(K):
            torch.mul(g[:, k : k + 1], g[:, k:], out=w[:, t : t + K - k]).neg_()
            w[:, t].add_(g[:, k])
            t += K - k
        if chunk.weight is not None:
            w.mul_(chunk.weight)
        return grad, batched_grams(chunk, w, "g")

    def log_prior_many(self, params: SoftmaxGateParams) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts, shape (S,)."""
        return -0.5 * self.alpha * ((params.coef * self._pen) ** 2).sum((1, 2))

    def m_step_many(self, params: SoftmaxGateParams, stats, data: EMData) -> SoftmaxGateParams:
        """:meth:`m_step` of S stacked starts: batched Cholesky solves of their Newton
        systems (the eigen-solve for a start whose system has no factor)."""
        V = params.coef  # (S, K, p)
        S, K, p = V.shape
        if K == 1:
            return params
        grad, hess = stats
        g = (grad - self.alpha * V * self._pen).reshape(S, K * p)
        if not self._use_newton:
            # the fixed bound, expanded: products of one start's shape each
            step = bound_step(self._bound_evals, self._bound_evecs.expand(S, -1, -1), g)
            return SoftmaxGateParams(V + step.view(S, K, p))
        blocks = unpack_grams(flat_grams(hess), p)[0].view(S, -1, p, p)  # (S, T, p, p)
        rows, cols, ridge = self._newton_consts
        A = V.new_zeros((S, K, K, p, p))
        A[:, rows, cols] = blocks
        A[:, cols, rows] = blocks
        A = A.transpose(2, 3).reshape(S, K * p, K * p) + ridge
        Ae, ge = even_system(A, g.unsqueeze(-1), 1.0)  # a start's factor is its own alone
        L, info = torch.linalg.cholesky_ex(Ae)
        step = torch.cholesky_solve(ge, L)[:, : K * p, 0]
        for s in torch.nonzero(info).flatten().tolist():  # no factor: the minimum-norm step
            step[s] = solve_psd(*even_system(A[s], g[s].unsqueeze(1), 0.0))[: K * p, 0]
        return SoftmaxGateParams(V + step.view(S, K, p))

    def log_prior(self, params: SoftmaxGateParams) -> float:
        pen = self._pen
        if pen is None:
            pen = self._penalty_mask(params.coef.shape[1], params.coef)
        return -0.5 * self.alpha * float(((params.coef * pen) ** 2).sum())

    def n_parameters(self, params: SoftmaxGateParams) -> int:
        return (self.n_experts - 1) * params.coef.shape[1]

    def select(self, params: SoftmaxGateParams, perm: torch.Tensor) -> SoftmaxGateParams:
        """The gate's rows ``perm`` (indices may repeat; add :meth:`shift` to renormalise)."""
        return SoftmaxGateParams(params.coef[perm].contiguous())

    def shift(self, params: SoftmaxGateParams, delta: torch.Tensor) -> SoftmaxGateParams:
        """The gate with log g_k(x) + delta_k for every x, when sum_k g_k e^{delta_k} = 1.

        The intercepts (last column) move by delta; the softmax's normaliser is unchanged
        when the shifted weights still sum to one, as for a split expert's two halves.
        """
        coef = params.coef.clone()
        coef[:, -1] += delta.to(coef)
        return SoftmaxGateParams(coef)

    # ------------------------------------------------------------ nesting
    def simpler(self) -> ConstantGate:
        """The constant gate this gate contains (all slopes zero)."""
        return ConstantGate(self.n_experts)

    def embed(self, params: ConstantGateParams, data: EMData) -> SoftmaxGateParams:
        """Constant weights pi as a softmax gate: intercepts log pi, slopes zero (exact)."""
        coef = params.log_pi.new_zeros((params.log_pi.shape[0], data.XgT.shape[0]))
        # an expert the constant gate emptied has log pi = -inf, which the penalty mask
        # would turn into NaN (0 * inf): a weight of e^-700 is zero in every sum
        coef[:, -1] = params.log_pi.clamp(min=-700.0)
        return SoftmaxGateParams(coef)

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: SoftmaxGateParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef}

    def from_free(self, free: dict[str, torch.Tensor]) -> SoftmaxGateParams:
        return SoftmaxGateParams(free["coef"])

    def log_weights_free(self, free: dict[str, torch.Tensor], XgT: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(free["coef"] @ XgT, dim=0)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        V = free["coef"]
        return -0.5 * self.alpha * (V[:, :-1] ** 2).sum()

    # ------------------------------------------------------------ reporting
    def report(self, params: SoftmaxGateParams, scaling: Scaling, reference: int = 0) -> Report:
        """Intercept and slopes of experts k != reference against the reference expert.

        Softmax weights depend only on differences of the rows of V, so the rows
        relative to one reference expert (as in flexmix and nnet's multinom) are the
        identified parameters.
        """
        K = self.n_experts
        others = [k for k in range(K) if k != reference]
        rel = params.coef[others] - params.coef[reference]  # (K-1, p)
        labels = coef_labels(scaling)
        out = Report(fixed={"gate_reference": torch.tensor(reference)})
        out.add("gate", coef_to_data(rel, scaling),
                [f"gate: expert {k} vs {reference}" for k in others for _ in labels],
                labels * len(others))  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        ref = int(fixed["gate_reference"])
        rel = coef_from_data(values["gate"], scaling)  # (K-1, p)
        rows = list(torch.unbind(rel))
        rows.insert(ref, torch.zeros_like(rel[0]))
        return {"coef": torch.stack(rows)}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: SoftmaxGateParams, chunk: Chunk, reference: int = 0):
        """Derivatives of log g_k in the logits eta_l of the experts l != reference:
        [k = l] - g_l, and -(diag g - g g^T) over those experts (for every k)."""
        g = log_softmax_rows(params.coef @ chunk.XgT)[1]  # (K, c)
        return multinomial_derivatives(g, reference)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """The logits' coefficients against the reference, on the standardised design."""
        coef = coef_from_data(values["gate"], scaling)  # (K-1, p)
        return coef.unsqueeze(0), coef.new_zeros((1, 0))

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`SoftmaxGateParams` fields for a gate design of p columns."""
        return {"coef": (self.n_experts, p)}

    def check_params(self, params: SoftmaxGateParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients (ValueError naming the field)."""
        check_finite(prefix + "coef", params.coef)
