"""Gradient fitting of a classical mixture of experts, jointly over gate and experts.

EM maximises the likelihood by alternating closed-form (or Newton) steps; here the
same objective is maximised directly by L-BFGS or Adam steps on all parameters at
once. It is how neural MoE is trained, and it needs nothing from a component but a
differentiable log-density, so gates and experts without an M-step can join.

Two objectives (Jacobs, Jordan, Nowlan and Hinton 1991), per sample, with g the
gate, mu_k the experts' means and p_k their densities:

- **competitive** (maximum likelihood, the objective EM maximises):
  E_i = -log sum_k g_k(x_i) p_k(y_i | x_i), plus the components' penalties.
- **cooperative** (squared error of the blended output):
  E_i = 1/2 ||y_i - sum_k g_k(x_i) mu_k(x_i)||^2. It fixes no variances: after it
  converges the experts' variances are fitted by maximum likelihood with the gate
  and the means held, so that the result is a mixture density like any other.

The expert's gradient shows why the competitive one makes experts specialise (see
``docs/inverse_problems.md``): it is h_ik (y_i - mu_ik) / sigma_k^2, with h_ik the
posterior responsibility, so expert k learns only from the cases it already
explains best; the cooperative gradient g_ik (y_i - sum_l g_il mu_il) pulls every
expert towards the shared residual, and experts learn to cancel each other's errors.

Parameters live in unconstrained form, so that every step is a valid model: the
softmax gate's K rows are all free (the L2 penalty on the slopes fixes the
softmax's shift invariance, as in :class:`~moekit.gates.softmax.SoftmaxGate`) and
variances are ``var_floor + exp(s)``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moekit._core.data import EMData
from moekit._core.logspace import LOG_2PI
from moekit.experts.gaussian import GaussianExperts
from moekit.experts.mlp import MLPExperts, mlp_forward
from moekit.fitting.em import EMModel, FitResult, Params
from moekit.gates.constant import ConstantGate
from moekit.gates.mlp import MLPGate, gate_logits
from moekit.gates.softmax import SoftmaxGate

__all__ = ["OBJECTIVES", "OPTIMIZERS", "run_gradient"]

OBJECTIVES = ("competitive", "cooperative")
OPTIMIZERS = ("lbfgs", "adam")
MAX_LINE_SEARCH = 25


# ------------------------------------------------------------------ adapters
# A differentiable view of each family: which fields of its params dataclass are
# optimised as they are, and its forward maps written out of place (the families'
# own log_prob works in place, for EM's speed). Expert variances are optimised as
# s with var = var_floor + exp(s); penalties are the families' own log-priors.
@dataclass(frozen=True)
class _ExpertView:
    weights: tuple[str, ...]
    mean: Callable  # (family, free, XeT (p, n)) -> (K, m, n)
    log_prior: Callable  # (family, free) -> scalar tensor


@dataclass(frozen=True)
class _GateView:
    weights: tuple[str, ...]
    log_weights: Callable  # (family, free, XgT (p, n)) -> (K, n), log g
    log_prior: Callable  # (family, free) -> scalar tensor


def _leaf(t: torch.Tensor) -> torch.Tensor:
    # a contiguous copy: L-BFGS flattens gradients with .view
    return t.detach().clone(memory_format=torch.contiguous_format)


def _zero(free: dict) -> torch.Tensor:
    return next(iter(free.values())).new_zeros(())


def _expert_var(fam, free: dict) -> torch.Tensor:
    return fam.var_floor + torch.exp(free["log_excess_var"])  # (K, m)


def _gauss_mean(fam, free: dict, XeT: torch.Tensor) -> torch.Tensor:
    K, m, p = free["coef"].shape
    # one (K m, p) @ (p, n) product: several times faster than einsum at this size
    return (free["coef"].reshape(K * m, p) @ XeT).reshape(K, m, -1)


def _mlp_decay(fam, *tensors: torch.Tensor) -> torch.Tensor:
    return -0.5 * fam.options["weight_decay"] * sum((t**2).sum() for t in tensors)


def _slope_mask(p: int, like: torch.Tensor) -> torch.Tensor:
    pen = torch.ones(p, dtype=like.dtype, device=like.device)
    pen[-1] = 0.0  # the design's last row is the intercept, which is not penalised
    return pen


def _softmax_log_prior(fam: SoftmaxGate, free: dict) -> torch.Tensor:
    V = free["coef"]  # (K, p), every row free: the penalty picks slopes summing to zero
    return -0.5 * fam.alpha * ((V * _slope_mask(V.shape[1], V)) ** 2).sum()


EXPERT_VIEWS = {
    GaussianExperts: _ExpertView(("coef",), _gauss_mean, lambda fam, f: _zero(f)),
    MLPExperts: _ExpertView(
        ("w1", "b1", "w2", "b2"),
        lambda fam, f, XeT: mlp_forward(f["w1"], f["b1"], f["w2"], f["b2"], XeT),
        lambda fam, f: _mlp_decay(fam, f["w1"], f["w2"]),
    ),
}

GATE_VIEWS = {
    SoftmaxGate: _GateView(
        ("coef",), lambda fam, f, XgT: torch.log_softmax(f["coef"] @ XgT, 0), _softmax_log_prior
    ),
    ConstantGate: _GateView(
        ("log_pi",),
        lambda fam, f, XgT: torch.log_softmax(f["log_pi"], 0).unsqueeze(1).expand(-1, XgT.shape[1]),
        lambda fam, f: _zero(f),
    ),
    MLPGate: _GateView(
        ("v2", "v1"),
        lambda fam, f, XgT: torch.log_softmax(gate_logits(f["v2"], f["v1"], XgT), 0),
        lambda fam, f: _mlp_decay(fam, f["v2"], f["v1"]),
    ),
}


def _to_free(view, family, params, is_expert: bool) -> dict:
    free = {w: _leaf(getattr(params, w)) for w in view.weights}
    if is_expert:
        excess = (params.var - family.var_floor).clamp(min=1e-6 * family.var_floor + 1e-300)
        free["log_excess_var"] = _leaf(torch.log(excess))
    return free


def _from_free(view, family, free: dict, is_expert: bool):
    values = {w: _leaf(free[w]) for w in view.weights}
    if is_expert:
        values["var"] = _leaf(_expert_var(family, free))
    if isinstance(family, ConstantGate):  # keep log pi normalised, as EM does
        values["log_pi"] = torch.log_softmax(values["log_pi"], 0)
    return family.params_type(**values)


def _view(table: dict, family, what: str):
    for kind, view in table.items():
        if isinstance(family, kind):
            return view
    known = ", ".join(k.__name__ for k in table)
    raise TypeError(
        f"gradient fitting has no differentiable form of the {what} {type(family).__name__}; "
        f"it supports {known}."
    )


# ------------------------------------------------------------------ objectives
def _log_prior(ev, gv, expert, gate, fe, fg) -> torch.Tensor:
    return ev.log_prior(expert, fe) + gv.log_prior(gate, fg)


def competitive_loss(ev, gv, expert, gate, fe, fg, XeT, XgT, y) -> torch.Tensor:
    """-(1/n) sum_i log sum_k g_k(x_i) p_k(y_i | x_i) - log_prior / n: minus EM's objective."""
    mean = ev.mean(expert, fe, XeT)  # (K, m, n)
    var = _expert_var(expert, fe).unsqueeze(-1)  # (K, m, 1)
    resid = y.reshape(1, mean.shape[1], -1) - mean
    log_p = (-0.5 * (LOG_2PI + torch.log(var) + resid * resid / var)).sum(1)  # (K, n)
    joint = log_p + gv.log_weights(gate, fg, XgT)
    n = joint.shape[1]
    return -torch.logsumexp(joint, 0).mean() - _log_prior(ev, gv, expert, gate, fe, fg) / n


def cooperative_loss(ev, gv, expert, gate, fe, fg, XeT, XgT, y) -> torch.Tensor:
    """(1/2n) sum_i ||y_i - sum_k g_k(x_i) mu_k(x_i)||^2 - log_prior / n."""
    g = torch.exp(gv.log_weights(gate, fg, XgT))  # (K, n)
    blend = torch.einsum("kn,kmn->mn", g, ev.mean(expert, fe, XeT))  # (m, n)
    resid = y.reshape(blend.shape) - blend
    n = resid.shape[1]
    return 0.5 * (resid * resid).sum(0).mean() - _log_prior(ev, gv, expert, gate, fe, fg) / n


LOSSES = {"competitive": competitive_loss, "cooperative": cooperative_loss}


# ------------------------------------------------------------------ optimisation
def _minimise(loss_fn, leaves, *, optimizer, max_iter, tol, lr, batch_size, n, gen, bar):
    """Minimise ``loss_fn(rows)`` over ``leaves``; returns (history, n_iter, converged).

    One iteration is one L-BFGS step (with a strong-Wolfe line search) on all rows,
    or one Adam epoch over mini-batches. ``history`` holds minus the full-data loss
    before the first and after every iteration, so that larger is better as in EM.
    """
    full = lambda: loss_fn(None)  # noqa: E731
    with torch.no_grad():
        history = [-float(full())]
    if optimizer == "lbfgs":

        def make_opt():
            return torch.optim.LBFGS(
                leaves, lr=1.0 if lr is None else lr, max_iter=1, history_size=20,
                # max_eval bounds the line search too (max_ls = max_eval - 1): torch's
                # default, max_iter * 5 // 4 = 1, would allow no search at all
                max_eval=MAX_LINE_SEARCH + 1, tolerance_grad=1e-12, tolerance_change=1e-15,
                line_search_fn="strong_wolfe",
            )  # fmt: skip

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = full()
            loss.backward()
            return loss

        opt = make_opt()
    else:
        opt = torch.optim.Adam(leaves, lr=0.01 if lr is None else lr)
    restarted = False
    converged, it = False, 0
    for it in range(1, max_iter + 1):  # noqa: B007  (it is read after the loop)
        if optimizer == "lbfgs":
            opt.step(closure)
        else:
            order = torch.randperm(n, generator=gen).to(leaves[0].device)
            bs = n if batch_size is None else min(batch_size, n)
            for start in range(0, n, bs):
                opt.zero_grad(set_to_none=True)
                loss_fn(order[start : start + bs]).backward()
                opt.step()
        with torch.no_grad():
            history.append(-float(full()))
        change = history[-1] - history[-2]
        if not math.isfinite(history[-1]):
            raise FloatingPointError(
                "gradient fitting diverged (non-finite objective); try optimizer='lbfgs' or "
                "a smaller learning_rate."
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{history[-1]:.6f}", change=f"{change:.2e}", refresh=False)
        if optimizer == "lbfgs" and change <= 0 and not restarted:
            # torch's strong-Wolfe search can fail (step 0) on a badly scaled curve and
            # L-BFGS then repeats the failed direction: drop its memory and try again
            opt, restarted = make_opt(), True
            history.pop()
            continue
        restarted = False
        if abs(change) < tol:
            converged = True
            break
    return history, it, converged


def _fit_from(model: EMModel, data: EMData, params: Params, *, objective, optimizer, max_iter,
              tol, lr, batch_size, gen, bar):  # fmt: skip
    expert, gate = model.expert, model.gate
    ev, gv = _view(EXPERT_VIEWS, expert, "expert family"), _view(GATE_VIEWS, gate, "gate")
    fe = {k: v.requires_grad_(True) for k, v in _to_free(ev, expert, params.expert, True).items()}
    fg = {k: v.requires_grad_(True) for k, v in _to_free(gv, gate, params.gate, False).items()}
    XeT, XgT, y = data.XeT, data.XgT, data.y
    loss = LOSSES[objective]

    def rows_loss(rows, fe=fe, fg=fg):
        if rows is None:
            return loss(ev, gv, expert, gate, fe, fg, XeT, XgT, y)
        return loss(ev, gv, expert, gate, fe, fg, XeT[:, rows], XgT[:, rows], y[..., rows])

    leaves = [*fe.values(), *fg.values()]
    if objective == "cooperative":
        # squared error does not see the variances: optimise means and gate only
        leaves = [v for k, v in fe.items() if k != "log_excess_var"] + list(fg.values())
    history, n_iter, converged = _minimise(
        rows_loss, leaves, optimizer=optimizer, max_iter=max_iter, tol=tol, lr=lr,
        batch_size=batch_size, n=data.n, gen=gen, bar=bar,
    )  # fmt: skip
    if objective == "cooperative" and "log_excess_var" in fe:
        # the variances that maximise the mixture likelihood for these means and gate
        fixed = {k: v.detach() for k, v in fe.items() if k != "log_excess_var"}
        fixed_g = {k: v.detach() for k, v in fg.items()}
        s = fe["log_excess_var"]

        def var_loss(rows):
            return competitive_loss(ev, gv, expert, gate, {**fixed, "log_excess_var": s},
                                    fixed_g, XeT, XgT, y)  # fmt: skip

        _minimise(var_loss, [s], optimizer="lbfgs", max_iter=200, tol=1e-12, lr=None,
                  batch_size=None, n=data.n, gen=gen, bar=None)  # fmt: skip
    new = Params(_from_free(ev, expert, fe, True), _from_free(gv, gate, fg, False))
    return new, history, n_iter, converged


def run_gradient(
    model: EMModel,
    data: EMData,
    *,
    init_resp: Callable[[EMData, torch.Generator], torch.Tensor],
    n_init: int = 1,
    max_iter: int = 500,
    tol: float = 1e-9,
    generator: torch.Generator,
    warm_params: Params | None = None,
    objective: str = "competitive",
    optimizer: str = "lbfgs",
    learning_rate: float | None = None,
    batch_size: int | None = None,
    verbose: int = 0,
) -> FitResult:
    """Fit a mixture of experts by gradient steps on the joint likelihood.

    The counterpart of :func:`moekit.fitting.em.run_em`, with the same inputs and
    result: each start takes the first M-step from ``init_resp`` (as EM does), then
    minimises the chosen objective jointly over every gate and expert parameter.

    Parameters
    ----------
    model : EMModel
        The expert family and gate; supported (see ``EXPERT_VIEWS``, ``GATE_VIEWS``):
        GaussianExperts or MLPExperts, with a SoftmaxGate, ConstantGate or MLPGate.
    data : EMData
        Standardised designs (p, n), the intercept as the last row, and target (m, n).
    init_resp : callable
        ``init_resp(data, generator) -> Tensor (K, n)``: starting responsibilities.
    n_init : int, default=1
        Starts; the one with the highest final log-likelihood objective is kept.
    max_iter : int, default=500
        Most iterations per start: L-BFGS steps, or Adam epochs.
    tol : float, default=1e-9
        Stop when the mean objective changes by less than this in one iteration.
    generator : torch.Generator
        Drives the initial responsibilities and Adam's batch order.
    warm_params : Params or None
        Start from these parameters instead (one start).
    objective : {'competitive', 'cooperative'}, default='competitive'
        Negative log-likelihood of the mixture (what EM maximises) or squared error
        of the blended output (variances fitted afterwards; see the module notes).
    optimizer : {'lbfgs', 'adam'}, default='lbfgs'
        Full-batch L-BFGS with a strong-Wolfe line search, or Adam.
    learning_rate : float or None
        L-BFGS step scale (default 1) or Adam's step size (default 0.01).
    batch_size : int or None
        Adam's mini-batch rows; None uses every row (L-BFGS always does).
    verbose : int, default=0
        1: a progress bar; 2: also a line per start.

    Returns
    -------
    FitResult
        ``params`` in the families' own dataclasses; ``loglik``, ``objective`` and
        ``nk`` from a final E-step of ``model`` (the very numbers EM would report);
        ``history`` holds minus the minimised loss before and after each iteration:
        EM's mean objective for 'competitive', minus the half mean squared error
        (plus penalty) for 'cooperative'.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}.")
    model.prepare(data)
    best = None
    starts = 1 if warm_params is not None else n_init
    for s in range(starts):
        bar = None
        if verbose:
            bar = tqdm(total=max_iter, desc=f"gradient start {s + 1}/{starts}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        start = (
            warm_params
            if warm_params is not None
            else model.init_from_resp(data, init_resp(data, generator))
        )
        with torch.enable_grad():
            params, history, n_iter, converged = _fit_from(
                model, data, start, objective=objective, optimizer=optimizer,
                max_iter=max_iter, tol=tol, lr=learning_rate, batch_size=batch_size,
                gen=generator, bar=bar,
            )  # fmt: skip
        final = model.e_pass(params, data, stats=False, keep_resp=True)
        if bar is not None:
            bar.close()
        if verbose >= 2:
            state = "converged" if converged else "stopped"
            print(f"start {s + 1}/{starts}: {state} after {n_iter} iterations, mean "
                  f"log-likelihood {final.loglik:.6f}", file=sys.stderr)  # fmt: skip
        result = FitResult(
            params=params,
            n_iter=n_iter,
            converged=converged,
            objective=final.objective,
            loglik=final.loglik,
            history=history,
            nk=final.resp.sum(1),
        )
        if best is None or result.objective > best.objective:
            best = result
    return best
