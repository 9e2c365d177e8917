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

import torch
from tqdm.auto import tqdm

from moekit._core.data import EMData
from moekit.fitting.em import run_em
from moekit.fitting.model import EMModel, FitResult, Params
from moekit.fitting.rows import start_rows
from moekit.fitting.starts import StartMaker, strategy_sequence

__all__ = ["OBJECTIVES", "OPTIMIZERS", "check_differentiable", "run_gradient"]

OBJECTIVES = ("competitive", "cooperative")
OPTIMIZERS = ("lbfgs", "adam")
MAX_LINE_SEARCH = 25

# What a family offers for gradient fitting, in its own module: free tensors
# (``to_free`` / ``from_free``), an out-of-place log-density (``log_prob_free`` for
# experts, ``log_weights_free`` for gates) and its penalty (``log_prior_free``); the
# cooperative objective also needs the experts' means (``mean_free``).
EXPERT_VIEW = ("to_free", "from_free", "log_prob_free", "log_prior_free")
GATE_VIEW = ("to_free", "from_free", "log_weights_free", "log_prior_free")


def check_differentiable(expert, gate, objective: str = "competitive") -> None:
    """Raise a ValueError naming the family that has no differentiable form."""
    needs = [("expert", expert, EXPERT_VIEW), ("gate", gate, GATE_VIEW)]
    if objective == "cooperative":
        needs[0] = ("expert", expert, (*EXPERT_VIEW, "mean_free"))
    for what, family, methods in needs:
        missing = [m for m in methods if not hasattr(family, m)]
        if missing:
            raise ValueError(
                f"fit_method='gradient' needs a differentiable form of the {what} "
                f"{type(family).__name__} (it lacks {', '.join(missing)}); use fit_method='em'."
            )


def _leaf(t: torch.Tensor) -> torch.Tensor:
    # a contiguous copy: L-BFGS flattens gradients with .view
    return t.detach().clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ objectives
def _log_prior(expert, gate, fe, fg) -> torch.Tensor:
    return expert.log_prior_free(fe) + gate.log_prior_free(fg)


def competitive_loss(expert, gate, fe, fg, XeT, XgT, y) -> torch.Tensor:
    """-(1/n) sum_i log sum_k g_k(x_i) p_k(y_i | x_i) - log_prior / n: minus EM's objective."""
    joint = expert.log_prob_free(fe, XeT, y) + gate.log_weights_free(fg, XgT)  # (K, n)
    n = joint.shape[1]
    return -torch.logsumexp(joint, 0).mean() - _log_prior(expert, gate, fe, fg) / n


def cooperative_loss(expert, gate, fe, fg, XeT, XgT, y) -> torch.Tensor:
    """(1/2n) sum_i ||y_i - sum_k g_k(x_i) mu_k(x_i)||^2 - log_prior / n."""
    g = torch.exp(gate.log_weights_free(fg, XgT))  # (K, n)
    blend = torch.einsum("kn,kmn->mn", g, expert.mean_free(fe, XeT))  # (m, n)
    resid = y.reshape(blend.shape) - blend
    n = resid.shape[1]
    return 0.5 * (resid * resid).sum(0).mean() - _log_prior(expert, gate, fe, fg) / n


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
    fe = {k: _leaf(v).requires_grad_(True) for k, v in expert.to_free(params.expert).items()}
    fg = {k: _leaf(v).requires_grad_(True) for k, v in gate.to_free(params.gate).items()}
    XeT, XgT, y = data.XeT, data.XgT, data.y
    loss = LOSSES[objective]

    def rows_loss(rows, fe=fe, fg=fg):
        if rows is None:
            return loss(expert, gate, fe, fg, XeT, XgT, y)
        return loss(expert, gate, fe, fg, XeT[:, rows], XgT[:, rows], y[..., rows])

    leaves = [*fe.values(), *fg.values()]
    # the squared error does not see the noise scales: optimise means and gate only
    scales = ("log_excess_var", "log_excess_df")
    if objective == "cooperative":
        leaves = [v for k, v in fe.items() if k not in scales] + list(fg.values())
    history, n_iter, converged = _minimise(
        rows_loss, leaves, optimizer=optimizer, max_iter=max_iter, tol=tol, lr=lr,
        batch_size=batch_size, n=data.n, gen=gen, bar=bar,
    )  # fmt: skip
    free_scales = [fe[k] for k in scales if k in fe]
    if objective == "cooperative" and free_scales:
        # the noise scales that maximise the mixture likelihood for these means and gate
        fixed = {k: v.detach() for k, v in fe.items() if k not in scales}
        fixed_g = {k: v.detach() for k, v in fg.items()}

        def scale_loss(rows):
            fe_now = {**fixed, **{k: fe[k] for k in scales if k in fe}}
            return competitive_loss(expert, gate, fe_now, fixed_g, XeT, XgT, y)

        _minimise(scale_loss, free_scales, optimizer="lbfgs", max_iter=200, tol=1e-12, lr=None,
                  batch_size=None, n=data.n, gen=gen, bar=None)  # fmt: skip
    with torch.no_grad():
        new = Params(expert.from_free({k: _leaf(v) for k, v in fe.items()}),
                     gate.from_free({k: _leaf(v) for k, v in fg.items()}))  # fmt: skip
    return new, history, n_iter, converged


def run_gradient(
    model: EMModel,
    data: EMData,
    *,
    init: str = "auto",
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
    result: each start is one of EM's (see :mod:`moekit.fitting.starts`), then
    minimises the chosen objective jointly over every gate and expert parameter.

    Parameters
    ----------
    model : EMModel
        The expert family and gate: any families with a differentiable form (see
        ``check_differentiable``).
    data : EMData
        Standardised designs (p, n), the intercept as the last row, and target (m, n).
    init : str, default='auto'
        Strategy of the starts, as EM's.
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
    check_differentiable(model.expert, model.gate, objective)
    model.prepare(data)
    best = None
    starts = 1 if warm_params is not None else n_init

    def fit_nested(small: EMModel, d: EMData, n: int) -> Params:
        res = run_em(
            small,
            d,
            init="auto",
            n_init=n,
            max_iter=max(max_iter, 1),
            tol=1e-6,
            init_max_iter=30,
            init_sample_size=None,
            generator=generator,
            warn=False,
        )
        model.prepare(d)
        return res.params

    # the starts see the rows in the fixed order EM's starts take (moekit.fitting.rows)
    sub = start_rows(data, None, generator)[0] if warm_params is None else data
    maker = StartMaker(model, sub, generator, fit_nested, starts)
    for s, strategy in enumerate(strategy_sequence(init, starts)):
        bar = None
        if verbose:
            bar = tqdm(total=max_iter, desc=f"gradient start {s + 1}/{starts}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        if warm_params is None:
            model.prepare(sub)
            start = maker.make(strategy)[1]
            model.prepare(data)
        else:
            start = warm_params
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
