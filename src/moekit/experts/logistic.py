"""Multinomial-logistic experts: p_k(y = c | x) = softmax(W_k x)_c.

W_k has one row of class scores per class, all free (the symmetric parametrisation,
as the softmax gate's): adding the same vector to every row leaves p_k unchanged,
and the L2 penalty on the slopes picks the solution whose slopes sum to zero over
classes. The M-step increases, for every expert at once,

.. math::  Q(W) = \\sum_k \\sum_i r_{ik} \\log \\operatorname{softmax}(W_k x_i)_{y_i}
                 - \\frac{\\alpha}{2} \\sum_k \\lVert W_k P \\rVert^2,

a concave function; P = diag(1, ..., 1, 0) leaves the intercept unpenalised. With
p_ik = softmax(W_k x_i), its gradient and negative Hessian in W_k are

.. math::  g_k = \\sum_i r_{ik} (e_{y_i} - p_{ik}) x_i^T - \\alpha W_k P, \\qquad
           A_k = \\sum_i r_{ik} (\\operatorname{diag} p_{ik} - p_{ik} p_{ik}^T)
                 \\otimes x_i x_i^T + \\alpha I \\otimes P.

The E-step has just computed p_ik, so both are sums over rows that ``chunk_stats``
gathers in the same pass: one EM iteration takes one step on Q and reads the data
once. Q splits into a part in the class-centred rows of W_k and a part in their
mean row, on which only the penalty acts. Newton's step treats both at once; the
other two set the slopes' mean over classes to zero, exactly, and work on the
centred rows.

**newton**: W_k += A_k^{-1} g_k. Building A_k takes C (C + 1) / 2 weighted Gram
matrices per expert, O(n (C p)^2), and solving it O((C p)^3).

**diagonal**: A_k with each row's class curvature diag p - p p^T replaced by the
diagonal of its absolute row sums, diag(2 p_c (1 - p_c)), which lies above it (the
difference is diagonally dominant): the model's curvature is at least Q's at W in
every direction, as in a damped Newton step. It takes C weighted Gram matrices per
expert, O(n C p^2), and C solves of p x p. With the blocks
D_c = X^T diag(2 r_k p_kc (1 - p_kc)) X + alpha P, the step that maximises the
model over class-centred steps is

.. math::  \\Delta_c = D_c^{-1} (g_c + \\lambda), \\qquad
           \\lambda = -\\Big(\\sum_c D_c^{-1}\\Big)^{-1} \\sum_c D_c^{-1} g_c.

For two classes the bound is exact on the centred rows and this is Newton's step.
Its C Grams per expert are formed in float32 on wide designs
(:meth:`~moekit._core.data.Chunk.curvature_grams`): the curvature only shapes the
step, while the gradient and the objective the loop checks stay float64 (on digits
a fit took 12 s against 20 s, to the same optimum).

**bohning**: every block X^T R_k X / 2 + alpha P, from Bohning's (1992) bound
B = 1/2 (I - 11^T / C) (x) X^T R_k X + alpha I (x) P, which lies above A_k at every
W: the step never lowers Q (a minorise-maximise step, ``monotone``), for one Gram
matrix per expert. As Q lies above the bound's quadratic minoriser, a step omega
in (0, 2) times as long still increases Q, by at least
omega (1 - omega / 2) g^T B^{-1} g; the step taken is ``OVER_RELAXATION`` times as
long.

The newton and diagonal steps are not guaranteed to increase Q; the EM loop checks
the likelihood and shortens a step that lowers it (in the runs below, once in 167
Newton iterations on digits and never with diagonal steps). ``solver="auto"`` takes
newton while C p is at most ``NEWTON_MAX_PARAMS`` and C > 2, diagonal otherwise.
Measured on all rows from one k-means start (n_init=1) run to convergence, on one
thread, EM needed as many iterations with either step on iris, wine and breast
cancer (142 and 150, 248 and 254, the same 1003) and on digits (C = 10, p = 65: 167
and 168, Newton's iterations costing five times as much); on synthetic mixtures with
C = 5 and 10 Newton needed 2.6 to 3.5 times fewer, at 1.4 to 2.1 times the cost per
iteration below C p = 256 (3.6 at C p = 330). Bohning needed 848 on digits: where
the experts are confident the bound lies far above the curvature and its steps are
short. A Kronecker curvature, each row's 2 max_c p_c (1 - p_c) times I - 11^T / C
(one Gram matrix per expert), needed 223 on digits at a tenth of the diagonal step's
Gram cost (a whole fit with the default starts about twice as fast), but on a C = 10
mixture it crept so slowly that EM stopped at ``tol`` 0.09 per sample below its
optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._core.batch import (
    batched_grams,
    design_sums,
    empty_experts,
    flat_grams,
    times_design,
)
from moekit._core.data import Chunk, EMData, unpack_grams
from moekit._core.derivatives import LocalDerivatives
from moekit._core.linalg import inverse_pd as _inverse_pd
from moekit._core.linalg import solve_pd as _solve_pd
from moekit._core.reporting import Report, Scaling, coef_from_data, coef_labels, coef_to_data
from moekit._core.validation import check_finite

SOLVERS = ("auto", "newton", "diagonal", "bohning")

NEWTON_MAX_PARAMS = 256
"""``solver="auto"`` uses Newton up to this many parameters per expert, C p."""

OVER_RELAXATION = 1.5
"""Length of the Bohning step relative to the bound's maximiser; monotone in (0, 2)."""


@dataclass
class LogisticParams:
    """coef of shape (K, C, p): class scores per expert, last column the intercept."""

    coef: torch.Tensor


def _grams(w: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """sum_i w_ji x_i x_i^T for every row j of w (J, c), as :meth:`Chunk.weighted_grams`."""
    return chunk.weighted_grams(w, "e")


def _unpack(grams: torch.Tensor, p: int) -> torch.Tensor:
    return unpack_grams(grams, p)[0]  # (J, p, p)


def centred_block_step(g: torch.Tensor, blocks: torch.Tensor, even: bool = False) -> torch.Tensor:
    """argmax of g . Delta - sum_c Delta_c^T D_c Delta_c / 2 over Delta with rows summing to 0.

    See the module docstring for the solution.

    Parameters
    ----------
    g : Tensor of shape (K, C, p)
    blocks : Tensor of shape (K, C, p, p) or (K, 1, p, p)
        D_c, or one D for every class.

    Returns
    -------
    Tensor of shape (K, C, p)
    """
    K, C, p = g.shape
    inv = _inverse_pd(blocks, even).expand(K, C, p, p)
    ig = inv @ g.unsqueeze(-1)  # (K, C, p, 1)
    lam = _solve_pd(inv.sum(1), -ig.sum(1), even)  # (K, p, 1)
    return (ig + inv @ lam.unsqueeze(1)).squeeze(-1)


class LogisticExperts:
    """K multinomial-logistic experts over C classes.

    Parameters
    ----------
    n_experts : int
    n_classes : int
    alpha : float
        L2 penalty on the slopes, on the scale of the summed log-likelihood (as
        scikit-learn's ``1 / C``).
    solver : {'auto', 'newton', 'diagonal', 'bohning'}
        The M-step (see the module docstring).
    """

    report_name = "multinomial logistic"
    needs_resp = False
    single_optimum = True  # alone, a concave (or closed-form) fit: K = 1 needs one start
    params_type = LogisticParams

    def __init__(
        self, n_experts: int, n_classes: int, alpha: float = 1.0, solver: str = "auto"
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
        self.n_experts = n_experts
        self.n_classes = n_classes
        self.alpha = alpha
        self.solver = solver
        self._step = "bohning" if solver == "bohning" else "newton"
        self._consts: dict | None = None

    def _constants(self, p: int, like: torch.Tensor) -> dict:
        """Tensors every M-step of a p-column design uses, built once per width.

        An EM iteration on a small data set is a few dozen small tensor operations,
        each costing microseconds of overhead: rebuilding these every step was a
        tenth of the step.
        """
        c = self._consts
        if (
            c is not None
            and c["p"] == p
            and c["alpha"] == self.alpha
            and c["pen"].dtype == like.dtype
            and c["pen"].device == like.device
        ):
            return c
        C = self.n_classes
        pen = like.new_ones(p)
        pen[-1] = 0.0  # no penalty on the intercept
        rows, cols = torch.triu_indices(C, C, device=like.device)
        # the intercepts' common shift u, along which the Newton system is singular
        u = like.new_zeros((C, p))
        u[:, -1] = C**-0.5
        u = u.reshape(-1)
        ridge_newton = self.alpha * torch.diag(pen.repeat(C)) + torch.outer(u, u)
        self._consts = {"p": p, "alpha": self.alpha, "pen": pen, "rows": rows, "cols": cols,
                        "diag": rows == cols, "ridge": self.alpha * torch.diag(pen),
                        "ridge_newton": ridge_newton}  # fmt: skip
        return self._consts

    @property
    def monotone(self) -> bool:
        return self._step == "bohning"

    def prepare(self, data: EMData) -> None:
        C, p = self.n_classes, data.XeT.shape[0]
        self._step = self.solver
        if self.solver == "auto":
            self._step = "newton" if C > 2 and C * p <= NEWTON_MAX_PARAMS else "diagonal"
        self._constants(p, data.XeT)

    def init_params(self, data: EMData) -> LogisticParams:
        p = data.XeT.shape[0]
        return LogisticParams(data.XeT.new_zeros((self.n_experts, self.n_classes, p)))

    # ------------------------------------------------------------ E-step
    def _log_probs(self, coef: torch.Tensor, XT: torch.Tensor) -> torch.Tensor:
        K, C, p = coef.shape
        logits = (coef.reshape(K * C, p) @ XT).reshape(K, C, -1)  # (K, C, n)
        return torch.log_softmax(logits, dim=1)

    def log_prob(self, params: LogisticParams, chunk: Chunk) -> torch.Tensor:
        logp = self._log_probs(params.coef, chunk.XeT)  # (K, C, c)
        chunk.scratch["logistic_logp"] = logp
        idx = chunk.y.view(1, 1, -1).expand(self.n_experts, 1, -1)
        return logp.gather(1, idx).squeeze(1)  # (K, c)

    def class_probs(self, params: LogisticParams, XT: torch.Tensor) -> torch.Tensor:
        """p_k(y = c | x) of shape (K, C, n)."""
        return torch.exp(self._log_probs(params.coef, XT))

    # ------------------------------------------------------------ M-step
    def chunk_stats(self, params: LogisticParams, chunk: Chunk, resp: torch.Tensor):
        """Each expert's weight (K,), the gradient's data part (K, C, p), the curvature's Grams."""
        logp = chunk.scratch.get("logistic_logp")
        if logp is None:
            logp = self._log_probs(params.coef, chunk.XeT)
        K, C = self.n_experts, self.n_classes
        xt = chunk.XeT  # (p, c)
        p, c = xt.shape
        prob = torch.exp(logp)  # (K, C, c)
        rp = prob * resp.unsqueeze(1)  # r_ik p_ikc
        # r_ik (e_{y_i} - p_ik), then its products with x_i
        w = rp.neg().scatter_add_(1, chunk.y.view(1, 1, -1).expand(K, 1, -1), resp.unsqueeze(1))
        grad = (w.reshape(K * C, c) @ xt.T).reshape(K, C, p)
        nk = resp.sum(1)
        if self._step == "bohning":
            return nk, grad, _grams(0.5 * resp, chunk)
        if self._step == "diagonal":
            d = rp.mul_(1.0 - prob).mul_(2.0)  # 2 r_ik p_ikc (1 - p_ikc), (K, C, c)
            # the curvature only shapes the step: float32 Grams (see curvature_grams)
            return nk, grad, chunk.curvature_grams(d.reshape(K * C, c), "e")
        # newton: weights r_ik p_ika (delta_ab - p_ikb) of the class blocks a <= b
        consts = self._constants(p, xt)
        hw = rp[:, consts["rows"]] * prob[:, consts["cols"]].neg()  # (K, T, c)
        hw[:, consts["diag"]] += rp
        return nk, grad, _grams(hw.reshape(-1, c), chunk)

    def m_step(self, params, stats, data: EMData, resp=None, *, even=False) -> LogisticParams:
        """One step on Q for every expert; ``params`` and ``stats`` may hold the experts of
        several fits of ``n_experts`` each, fit after fit (``even``: systems of even size,
        see :func:`moekit._core.linalg.solve_pd`)."""
        if params is None:
            params = self.init_params(data)
        nk, grad, curv = stats
        W = params.coef  # (K, C, p)
        K, p = W.shape[0], W.shape[2]
        consts = self._constants(p, W)
        pen = consts["pen"]
        g = grad - self.alpha * W * pen  # gradient of Q, (K, C, p)
        if self._step == "newton":
            step = self._newton_step(g, curv, consts, even)
        else:
            blocks = _unpack(curv, p).reshape(K, -1, p, p) + consts["ridge"]
            step = centred_block_step(g, blocks, even)
            if self._step == "bohning":
                step *= OVER_RELAXATION
            step -= W.mean(1, keepdim=True) * pen  # the mean row's exact step
        # an expert with no weight at all is not determined by the data: keep it as it was
        empty = empty_experts(nk, self.n_experts)
        return LogisticParams(W + step.masked_fill_(empty[:, None, None], 0.0))

    # ------------------------------------------------------------ many starts at once
    # S starts stacked on a leading axis (moekit._core.batch): coef (S, K, C, p)
    batchable = True

    def log_prob_many(self, params: LogisticParams, chunk: Chunk) -> torch.Tensor:
        """:meth:`log_prob` of S stacked starts, shape (S, K, c)."""
        S, K, C, p = params.coef.shape
        logits = times_design(params.coef.reshape(S, K * C, p), chunk.XeT).reshape(S, K, C, -1)
        logp = chunk.scratch["logistic_logp_many"] = torch.log_softmax(logits, dim=2)
        return logp.gather(2, chunk.y.view(1, 1, 1, -1).expand(S, K, 1, -1)).squeeze(2)

    def chunk_stats_many(self, params: LogisticParams, chunk: Chunk, resp: torch.Tensor):
        """:meth:`chunk_stats` of S stacked starts (resp (S, K, c)), each stacked."""
        prob = torch.exp(chunk.scratch["logistic_logp_many"])  # (S, K, C, c)
        S, K, C, c = prob.shape
        xt = chunk.XeT
        rp = prob * resp.unsqueeze(2)
        idx = chunk.y.view(1, 1, 1, -1).expand(S, K, 1, -1)
        w = rp.neg().scatter_add_(2, idx, resp.unsqueeze(2))
        grad = design_sums(w.reshape(S, K * C, c), xt).reshape(S, K, C, -1)
        nk = resp.sum(2)
        if self._step == "bohning":
            return nk, grad, batched_grams(chunk, 0.5 * resp)
        if self._step == "diagonal":
            d = rp.mul_(1.0 - prob).mul_(2.0).reshape(S, K * C, c)
            return nk, grad, batched_grams(chunk, d, curvature=True)
        consts = self._constants(xt.shape[0], xt)
        hw = rp[:, :, consts["rows"]] * prob[:, :, consts["cols"]].neg()  # (S, K, T, c)
        hw[:, :, consts["diag"]] += rp
        return nk, grad, batched_grams(chunk, hw.reshape(S, -1, c))

    def log_prior_many(self, params: LogisticParams) -> torch.Tensor:
        """:meth:`log_prior` of S stacked starts, shape (S,)."""
        return -0.5 * self.alpha * (params.coef[..., :-1] ** 2).sum((1, 2, 3))

    def m_step_many(self, params: LogisticParams, stats, data: EMData) -> LogisticParams:
        nk, grad, curv = stats
        S, K, C, p = params.coef.shape
        flat = LogisticParams(params.coef.reshape(S * K, C, p))
        stats = (nk.reshape(-1), grad.reshape(S * K, C, p), flat_grams(curv))
        return LogisticParams(self.m_step(flat, stats, data, even=True).coef.view(S, K, C, p))

    def _newton_step(self, g, hess, consts, even: bool = False) -> torch.Tensor:
        K, C, p = g.shape
        rows, cols = consts["rows"], consts["cols"]
        blocks = _unpack(hess, p).reshape(K, -1, p, p)  # (K, T, p, p), class pairs a <= b
        A = g.new_zeros((K, C, C, p, p))
        A[:, rows, cols] = blocks
        A[:, cols, rows] = blocks
        # A is singular along the intercepts' common shift u, where g has no part:
        # adding u u^T (in "ridge_newton", with the penalty) makes it definite and
        # leaves the step without a part along u
        A = A.transpose(2, 3).reshape(K, C * p, C * p) + consts["ridge_newton"]
        return _solve_pd(A, g.reshape(K, C * p, 1), even).reshape(K, C, p)

    def select(self, params: LogisticParams, perm: torch.Tensor) -> LogisticParams:
        """The experts ``perm`` (indices may repeat), as the parameters of len(perm) experts."""
        return LogisticParams(params.coef[perm].contiguous())

    def _penalty(self, coef: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.alpha * (coef[..., :-1] ** 2).sum()

    def residuals(self, params: LogisticParams, chunk: Chunk) -> torch.Tensor:
        """Residuals onehot(y) - p_k(. | x) of the class probabilities, shape (K, C, c)."""
        probs = torch.exp(self._log_probs(params.coef, chunk.XeT))
        onehot = torch.nn.functional.one_hot(chunk.y, self.n_classes).T.to(probs.dtype)
        return onehot.unsqueeze(0) - probs

    # ------------------------------------------------------------ differentiable view
    def to_free(self, params: LogisticParams) -> dict[str, torch.Tensor]:
        return {"coef": params.coef}

    def from_free(self, free: dict[str, torch.Tensor]) -> LogisticParams:
        return LogisticParams(free["coef"])

    def log_prob_free(self, free: dict[str, torch.Tensor], XT: torch.Tensor, y: torch.Tensor):
        """log p_k(y_i | x_i) of shape (K, n), differentiable in ``free``."""
        logp = self._log_probs(free["coef"], XT)  # (K, C, n)
        return logp.gather(1, y.view(1, 1, -1).expand(self.n_experts, 1, -1)).squeeze(1)

    def log_prior_free(self, free: dict[str, torch.Tensor]) -> torch.Tensor:
        return -self._penalty(free["coef"])

    # ------------------------------------------------------------ reporting
    def report(self, params: LogisticParams, scaling: Scaling) -> Report:
        """Per expert, the scores of classes 1..C-1 against class 0 in the data's units."""
        rel = params.coef[:, 1:] - params.coef[:, :1]  # (K, C-1, p)
        labels = coef_labels(scaling)
        names = scaling.output_names
        out = Report()
        out.add("logit", coef_to_data(rel, scaling),
                [f"expert {k}" for k in range(self.n_experts) for _ in names[1:] for _ in labels],
                [f"[{c} vs {names[0]}] {nm}" for _ in range(self.n_experts) for c in names[1:]
                 for nm in labels])  # fmt: skip
        return out

    def from_report(self, values: dict, scaling: Scaling, fixed: dict) -> dict:
        rel = coef_from_data(values["logit"], scaling)  # (K, C-1, p)
        return {"coef": torch.cat([torch.zeros_like(rel[:, :1]), rel], 1)}

    # ------------------------------------------------------------ analytic information
    def local_derivatives(self, params: LogisticParams, chunk: Chunk, scaling: Scaling):
        """Derivatives of log p_k(y) in the logits of classes 1..C-1 against class 0:
        e_y - p and -(diag p - p p^T), restricted to those classes."""
        prob = torch.exp(self._log_probs(params.coef, chunk.XeT))[:, 1:]  # (K, C-1, c)
        onehot = torch.nn.functional.one_hot(chunk.y, self.n_classes).T[1:].to(prob.dtype)
        d2 = -prob.unsqueeze(2) * prob.unsqueeze(1)  # (K, C-1, C-1, c)
        j = torch.arange(self.n_classes - 1)
        d2[:, j, j] += prob
        return LocalDerivatives(onehot.unsqueeze(0) - prob, d2.neg_(), self.n_classes - 1)

    def local_parameters(self, values: dict, scaling: Scaling, fixed: dict):
        """Coefficients of the logits against class 0 on the standardised design."""
        coef = coef_from_data(values["logit"], scaling)  # (K, C-1, p)
        return coef, coef.new_zeros((coef.shape[0], 0))

    def log_prior(self, params: LogisticParams) -> float:
        return -float(self._penalty(params.coef))

    def min_samples(self, params: LogisticParams) -> float:
        """Penalised experts stay defined on few samples; below one, they are unused."""
        return 1.0

    def n_parameters(self, params: LogisticParams) -> int:
        K, C, p = params.coef.shape
        return K * (C - 1) * p

    # ------------------------------------------------------------ model files
    def param_shapes(self, p: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the :class:`LogisticParams` fields for a design of p columns."""
        return {"coef": (self.n_experts, self.n_classes, p)}

    def check_params(self, params: LogisticParams, prefix: str = "") -> None:
        """Refuse non-finite coefficients (ValueError naming the field)."""
        check_finite(prefix + "coef", params.coef)
