"""Starting responsibilities for EM: pure functions of the data and a generator.

Each returns responsibilities of shape (K, n), from which the first M-step builds
the starting parameters. They explore different basins of the likelihood:

* ``kmeans_resp``: k-means on the standardised rows [x, y], so that experts start
  on regions of the input *and* output space;
* ``random_resp``: a random expert per row (flexmix's start), and
  ``dirichlet_resp``: soft random responsibilities; both start every expert near the
  pooled fit and let EM break the symmetry, which finds crossing regression lines
  that k-means on [x, y] cuts into x-bands;
* ``residual_resp``: k-means on the residuals of one pooled expert, which separates
  rows above and below the pooled fit;
* ``ward_resp``: Ward's agglomerative clustering of the same rows as k-means, cut
  at K clusters: deterministic, and the start of mclust's Gaussian mixtures (its
  model-based agglomeration is Ward's criterion for spherical clusters);
* ``split_resp``: one expert of a fitted (K - 1)-expert model split in two along the
  sign of its residuals.
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


def dirichlet_resp(data: EMData, K: int, generator: torch.Generator) -> torch.Tensor:
    """Responsibilities drawn from a flat Dirichlet per row: (K, n), soft."""
    e = -torch.log(torch.rand((K, data.n), generator=generator, dtype=data.XeT.dtype))
    return (e / e.sum(0, keepdim=True)).to(data.XeT.device)  # exponentials normalised


KMEANS_ROWS = 10_000
"""k-means runs on at most this many rows; the others join their nearest centre."""


def _kmeans_draws(n: int, generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """k-means' seed, and the rows it runs on when n > ``KMEANS_ROWS`` (else None).

    With K = 1 no k-means runs (one cluster holds every row: k-means would cost a
    millisecond to say so), but these draws are still taken, so that the generator,
    and every later start drawn from it, is where k-means would have left it.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rows = None
    if n > KMEANS_ROWS:
        rows = torch.randperm(n, generator=generator)[:KMEANS_ROWS]
    return seed, rows


def _standardised(Z: torch.Tensor) -> torch.Tensor:
    sd = Z.std(0, correction=0)
    return (Z - Z.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))


def _clustered_rows(data: EMData, target: torch.Tensor | None) -> torch.Tensor:
    """The standardised rows (n, d) k-means and Ward cluster: the features and the
    finite target rows (the intercept row dropped)."""
    feats = [data.XeT[:-1]]  # drop the intercept row
    y = data.y if target is None else target
    if y is not None and y.is_floating_point():
        y = y.reshape(-1, data.n)
        # rows holding infinities (the open ends of censored intervals) say nothing
        # a clustering can use
        feats.append(y[torch.isfinite(y).all(1)])
    return torch.cat(feats, 0).T.cpu()


def _kmeans_labels(Z: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """k-means labels of the rows of Z (n, d), standardised column-wise first."""
    seed, rows = _kmeans_draws(Z.shape[0], generator)
    if K == 1:
        return torch.zeros(Z.shape[0], dtype=torch.long)
    from sklearn.cluster import KMeans

    Z = _standardised(Z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters is fine
        km = KMeans(n_clusters=K, n_init=1, random_state=seed)
        km.fit((Z if rows is None else Z[rows]).numpy())
    centres = torch.as_tensor(km.cluster_centers_, dtype=Z.dtype)
    labels = torch.cat([torch.cdist(part, centres).argmin(1) for part in Z.split(65536)])
    return _fill_empty(labels, K, generator)


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
        is a float tensor); rows with an infinite value are left out.
    """
    if K == 1:  # every row in the one cluster, after k-means' draws
        _kmeans_draws(data.n, generator)
        return data.XeT.new_ones((1, data.n))
    Z = _clustered_rows(data, target)  # (n, d)
    return _one_hot(_kmeans_labels(Z, K, generator).to(data.XeT.device), K, data.XeT)


WARD_ROWS = 2000
"""Ward's agglomeration runs on at most this many rows (its memory is quadratic in
them, as mclust's, whose default subset is also 2000); the others join the nearest
cluster mean."""


def ward_resp(
    data: EMData, K: int, generator: torch.Generator, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Ward's agglomerative clustering cut at K clusters: responsibilities (K, n).

    Ward's method merges, at each step, the two clusters whose union least increases
    the within-cluster sum of squares of the standardised [features, target] rows
    (``target`` as in :func:`kmeans_resp`). The tree depends on the rows alone, so
    the start is the same for every seed when n <= ``WARD_ROWS``; on more rows it is
    built on a random subset of ``WARD_ROWS`` (drawn from ``generator``) and every
    row joins its nearest cluster mean.
    """
    if K == 1:
        return data.XeT.new_ones((1, data.n))
    from scipy.cluster.hierarchy import fcluster, linkage

    Z = _standardised(_clustered_rows(data, target))
    rows = None
    if Z.shape[0] > WARD_ROWS:
        rows = torch.randperm(Z.shape[0], generator=generator)[:WARD_ROWS]
    part = Z if rows is None else Z[rows]
    if part.shape[1] == 0 or part.shape[0] < 2:  # nothing to cluster on
        labels = torch.zeros(Z.shape[0], dtype=torch.long)
        return _one_hot(_fill_empty(labels, K, generator).to(data.XeT.device), K, data.XeT)
    tree = linkage(part.numpy(), method="ward")
    found = torch.as_tensor(fcluster(tree, K, criterion="maxclust") - 1, dtype=torch.long)
    if rows is None:
        labels = found
    else:
        ids = torch.unique(found)
        centres = torch.stack([part[found == k].mean(0) for k in ids.tolist()])
        nearest = torch.cat([torch.cdist(c, centres).argmin(1) for c in Z.split(65536)])
        labels = ids[nearest]
    return _one_hot(_fill_empty(labels, K, generator).to(data.XeT.device), K, data.XeT)


def residual_resp(resid: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """k-means on the residuals (r, n) of one pooled expert: responsibilities (K, n)."""
    labels = _kmeans_labels(resid.T.cpu(), K, generator)
    return _one_hot(labels.to(resid.device), K, resid)


def split_direction(resid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Scores (n,) along which to split an expert: its residual, or for several outputs
    the projection on the leading direction of the weighted residual covariance."""
    if resid.shape[0] == 1:
        return resid[0]
    cov = (resid * weight) @ resid.T  # (r, r)
    evecs = torch.linalg.eigh(cov)[1]
    return evecs[:, -1] @ resid


def split_resp(resp: torch.Tensor, resid: torch.Tensor, j: int) -> torch.Tensor:
    """Split expert j of a (K - 1)-expert fit along the sign of its residuals.

    Parameters
    ----------
    resp : Tensor of shape (K - 1, n)
        Responsibilities of the fitted model.
    resid : Tensor of shape (r, n)
        Residuals of expert j (see the families' ``residuals``).
    j : int

    Returns
    -------
    Tensor of shape (K, n)
        The other experts' responsibilities, then expert j's on the rows above its
        fit, then on the rows below: expert j is the last two.
    """
    up = (split_direction(resid, resp[j]) > 0).to(resp.dtype)
    keep = torch.cat([resp[:j], resp[j + 1 :]])
    return torch.cat([keep, (resp[j] * up).unsqueeze(0), (resp[j] * (1 - up)).unsqueeze(0)])


def band_resp(weight: torch.Tensor, resid: torch.Tensor, n_bands: int) -> torch.Tensor:
    """Split one expert's rows into ``n_bands`` bands of its residuals.

    The rows are ordered along the split direction (:func:`split_direction`) and cut
    at the weighted quantiles 1/n_bands, 2/n_bands, ... of ``weight``, so every band
    holds about the same total weight.

    Parameters
    ----------
    weight : Tensor of shape (n,)
        The expert's responsibilities.
    resid : Tensor of shape (r, n)
        Its residuals (see the families' ``residuals``).
    n_bands : int

    Returns
    -------
    Tensor of shape (n_bands, n)
        ``weight`` on the rows of each band, zero elsewhere; the bands sum to ``weight``.
    """
    score = split_direction(resid, weight)
    order = torch.argsort(score)
    cum = torch.cumsum(weight[order], 0)
    frac = (cum - 0.5 * weight[order]) / cum[-1].clamp(min=1e-300)  # mid-point of each row
    band = torch.empty_like(order)
    band[order] = (frac * n_bands).long().clamp(0, n_bands - 1)
    out = weight.new_zeros((n_bands, weight.shape[0]))
    out[band, torch.arange(weight.shape[0], device=weight.device)] = weight
    return out
