"""Starting responsibilities for EM.

``"kmeans"`` clusters the standardised rows [x, y] (so that experts start on regions
of the input *and* output space, which separates crossing regression lines), and
``"random"`` draws a random expert for every row, as flexmix does. Both give hard
(one-hot) responsibilities; clusters left empty are given random rows so that every
expert starts with data.
"""

from __future__ import annotations

import warnings

import torch

from moekit._core.data import EMData


def _one_hot(labels: torch.Tensor, K: int, like: torch.Tensor) -> torch.Tensor:
    resp = like.new_zeros((K, labels.shape[0]))
    resp[labels, torch.arange(labels.shape[0], device=like.device)] = 1.0
    return resp


def _fill_empty(labels: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=K)
    if bool((counts > 0).all()) or labels.shape[0] < K:
        return labels
    labels = labels.clone()
    order = torch.randperm(labels.shape[0], generator=generator)
    for k, pos in zip(torch.nonzero(counts == 0).flatten().tolist(), order.tolist(), strict=False):
        labels[pos] = k
    return labels


def random_resp(data: EMData, K: int, generator: torch.Generator) -> torch.Tensor:
    """One random expert per row: responsibilities (K, n)."""
    labels = torch.randint(0, K, (data.n,), generator=generator)
    return _one_hot(_fill_empty(labels, K, generator).to(data.XeT.device), K, data.XeT)


KMEANS_ROWS = 10_000
"""k-means runs on at most this many rows; the others join their nearest centre."""


def kmeans_resp(
    data: EMData, K: int, generator: torch.Generator, target: torch.Tensor | None = None
) -> torch.Tensor:
    """k-means on the standardised [features, target] rows: responsibilities (K, n).

    The centres are found on a random subset of at most ``KMEANS_ROWS`` rows (a few
    thousand rows place K centres as well as a million do, at a fraction of the
    cost), then every row is assigned to its nearest centre.

    Parameters
    ----------
    target : Tensor of shape (m, n), optional
        The target rows to cluster on with the features (default ``data.y`` when it
        is a float tensor).
    """
    from sklearn.cluster import KMeans

    feats = [data.XeT[:-1]]  # drop the intercept row
    y = data.y if target is None else target
    if y is not None and y.is_floating_point():
        feats.append(y.reshape(-1, data.n))
    Z = torch.cat(feats, 0).T.cpu()  # (n, d)
    sd = Z.std(0, correction=0)
    Z = (Z - Z.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rows = None
    if data.n > KMEANS_ROWS:
        rows = torch.randperm(data.n, generator=generator)[:KMEANS_ROWS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters is fine
        km = KMeans(n_clusters=K, n_init=1, random_state=seed)
        km.fit((Z if rows is None else Z[rows]).numpy())
    centres = torch.as_tensor(km.cluster_centers_, dtype=Z.dtype)
    labels = torch.cat([torch.cdist(part, centres).argmin(1) for part in Z.split(65536)])
    labels = _fill_empty(labels, K, generator)
    return _one_hot(labels.to(data.XeT.device), K, data.XeT)
