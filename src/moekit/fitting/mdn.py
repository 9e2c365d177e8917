"""The mixture density network's pure maths, network and initialisation.

The network maps standardised x to the parameters of a Gaussian mixture over the
standardised y: K mixing logits, K m means and K m scales (softplus plus a floor).
:class:`moekit.estimators.mdn.MDNRegressor` trains it and answers in the user's units.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from moekit._core.logspace import LOG_2PI

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


# ------------------------------------------------------------------ pure maths
def mdn_split(out: torch.Tensor, K: int, m: int, min_std: float):
    """Split raw network outputs (n, K (1 + 2m)) into the mixture's parameters.

    Returns
    -------
    log_pi : Tensor of shape (n, K)
        log softmax of the first K outputs.
    mu : Tensor of shape (n, K, m)
    sigma : Tensor of shape (n, K, m)
        softplus(s) + min_std: smooth, positive and bounded below, so that no
        component can shrink onto one point and send the likelihood to infinity.
    """
    n = out.shape[0]
    log_pi = torch.log_softmax(out[:, :K], dim=1)
    mu = out[:, K : K + K * m].reshape(n, K, m)
    sigma = F.softplus(out[:, K + K * m :].reshape(n, K, m)) + min_std
    return log_pi, mu, sigma


def mdn_log_prob(
    log_pi: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """log p(y_i | x_i) = logsumexp_k [log pi_ik + sum_j log N(y_ij; mu_ikj, sigma_ikj^2)].

    Parameters
    ----------
    log_pi : Tensor of shape (n, K)
    mu, sigma : Tensor of shape (n, K, m)
    y : Tensor of shape (n, m)

    Returns
    -------
    Tensor of shape (n,)
    """
    z = (y.unsqueeze(1) - mu) / sigma  # (n, K, m)
    log_n = (-0.5 * (LOG_2PI + z * z) - torch.log(sigma)).sum(-1)  # (n, K)
    return torch.logsumexp(log_pi + log_n, dim=1)


class _MDNNet(torch.nn.Module):
    """MLP trunk and one linear head giving K mixing logits, K m means, K m scales."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], activation: str, n_out: int):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [torch.nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.trunk = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def mdn_param_shapes(n_in: int, hidden: tuple[int, ...], n_out: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of :class:`_MDNNet`'s ``state_dict``, without building the network.

    Model files are checked against these before a tensor is read or a layer allocated.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    width = n_in
    for i, h in enumerate(hidden):  # trunk: Linear, activation, Linear, activation, ...
        shapes[f"trunk.{2 * i}.weight"] = (h, width)
        shapes[f"trunk.{2 * i}.bias"] = (h,)
        width = h
    shapes["head.weight"] = (n_out, width)
    shapes["head.bias"] = (n_out,)
    return shapes


def _standardiser(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = A.mean(0), A.std(0)
    return mean, np.where(sd > 0, sd, 1.0)


def _init_weights(net: _MDNNet, T: torch.Tensor, K: int, m: int, min_std: float, gen) -> None:
    """Glorot-uniform weights drawn from ``gen``; a head that starts on the data.

    The head's mean biases start at K targets drawn from the training rows and its
    mean weights near zero, so that every component starts where there are data
    (a common remedy for components that never receive any); every scale starts at
    about 0.3 of the target's standard deviation, every weight at 1 / K.
    """
    with torch.no_grad():
        for layer in [*net.trunk, net.head]:
            if isinstance(layer, torch.nn.Linear):
                fan_out, fan_in = layer.weight.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound)
                layer.bias.zero_()
        head = net.head
        head.weight[K:] *= 0.1
        rows = torch.randint(0, T.shape[0], (K,), generator=gen)
        head.bias[K : K + K * m] = T[rows].reshape(-1).to(head.bias.dtype)
        # softplus^{-1}(0.3 - min_std) = log(expm1(.)), for the scales' biases
        target = max(0.3 - min_std, 1e-3)
        head.bias[K + K * m :] = math.log(math.expm1(target))


# ------------------------------------------------------------------ training
TRAIN_SETTINGS = ("learning_rate", "weight_decay", "batch_size", "min_std", "max_iter", "tol",
                  "n_iter_no_change", "verbose")  # fmt: skip
"""The estimator's settings that :func:`train_mdn` takes."""


def train_mdn(net, Z, T, train, val, K: int, m: int, gen, *, learning_rate: float,
              weight_decay: float, batch_size: int, min_std: float, max_iter: int, tol: float,
              n_iter_no_change: int, verbose: int):  # fmt: skip
    """Train the network by Adam on the negative log-likelihood, with early stopping.

    Each epoch takes mini-batches of the rows ``train`` in a random order; the
    monitored loss is the mean negative log-likelihood of the rows ``val`` (of the
    training rows when ``val`` is empty). Training stops after ``n_iter_no_change``
    epochs without an improvement larger than ``tol``, and the network is set back
    to its best validation state.

    Returns
    -------
    history : list of float
        The training rows' mean log-likelihood after each epoch (standardised units).
    val_scores : list of float
        The validation rows' mean log-likelihood after each epoch (empty without).
    n_iter : int
    converged : bool
    """
    params = list(net.parameters())
    try:  # the fused step is about a third faster on CPUs and GPUs alike
        opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - a device without it
        opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    bs = min(batch_size, len(train))
    best, best_state, stall = math.inf, None, 0
    history: list[float] = []
    val_scores: list[float] = []
    converged = False
    bar = tqdm(range(max_iter), desc="MDN", disable=not verbose, leave=False)
    epoch = 0
    for epoch in bar:  # noqa: B007  (epoch is read after the loop)
        net.train()
        order = train[torch.randperm(len(train), generator=gen)].to(Z.device)
        total = Z.new_zeros(())  # summed on the device: no host sync per batch
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            loss = -mdn_log_prob(*mdn_split(net(Z[idx]), K, m, min_std), T[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        train_nll = float(total) / len(order)
        if not math.isfinite(train_nll):
            raise FloatingPointError(
                "MDN training diverged (non-finite loss); try a smaller learning_rate "
                "or a larger min_std."
            )
        history.append(-train_nll)
        if len(val):
            net.eval()
            with torch.no_grad():
                iv = val.to(Z.device)
                nll = -float(mdn_log_prob(*mdn_split(net(Z[iv]), K, m, min_std), T[iv]).mean())
            val_scores.append(-nll)
        else:
            nll = train_nll
        bar.set_postfix(train_nll=f"{train_nll:.4f}", monitored=f"{nll:.4f}", refresh=False)
        if nll < best - tol:
            best, stall = nll, 0
            if len(val):
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stall += 1
        if stall >= n_iter_no_change:
            converged = True
            break
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    if not converged:
        warnings.warn(
            f"MDN training stopped at max_iter={max_iter} epochs before the loss "
            f"stopped improving by tol={tol:g}; increase max_iter or learning_rate.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return history, val_scores, epoch + 1, converged
