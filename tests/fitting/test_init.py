"""Starting responsibilities: what the cheap paths must give exactly as the full ones."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from moekit.fitting.init import KMEANS_ROWS, _kmeans_labels


@pytest.mark.parametrize("n", [50, KMEANS_ROWS + 7])
def test_one_cluster_labels_every_row_and_draws_as_kmeans_does(n, monkeypatch):
    """With K = 1 no k-means runs, but the labels are k-means' own (every row in the one
    cluster) and the generator is left where the k-means path leaves it: a seed drawn,
    and on large data a subset of rows, so every later start draws the same."""
    Z = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    with monkeypatch.context() as m:
        m.setattr("sklearn.cluster.KMeans", None)  # one cluster needs no k-means run
        labels = _kmeans_labels(Z, 1, gen)
    km = KMeans(n_clusters=1, n_init=1, random_state=0).fit(Z.numpy())
    assert labels.dtype == torch.long
    assert np.array_equal(labels.numpy(), km.labels_)
    ref = torch.Generator().manual_seed(0)
    torch.randint(0, 2**31 - 1, (1,), generator=ref)
    if n > KMEANS_ROWS:
        torch.randperm(n, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())
    # and the draws are those of two clusters too: the paths differ only after them
    two = torch.Generator().manual_seed(0)
    _kmeans_labels(Z, 2, two)
    if n <= KMEANS_ROWS:
        assert torch.equal(two.get_state(), ref.get_state())


def test_one_cluster_responsibilities_are_every_row_after_the_same_draws():
    """kmeans_resp with K = 1 builds no rows to cluster: ones (1, n), and the generator
    where the k-means path of the same data leaves it."""
    from moekit._core.data import EMData
    from moekit.fitting.init import kmeans_resp

    g = torch.Generator().manual_seed(2)
    XeT = torch.cat([torch.randn(2, 40, generator=g, dtype=torch.float64),
                     torch.ones(1, 40, dtype=torch.float64)])  # fmt: skip
    data = EMData(XeT, XeT, torch.randn(1, 40, generator=g, dtype=torch.float64))
    gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    resp = kmeans_resp(data, 1, gen)
    labels = _kmeans_labels(torch.cat([XeT[:-1], data.y]).T, 1, ref)
    assert resp.dtype == XeT.dtype and resp.shape == (1, 40)
    assert torch.equal(resp, torch.ones(1, 40, dtype=torch.float64))
    assert torch.equal(labels, torch.zeros(40, dtype=torch.long))
    assert torch.equal(gen.get_state(), ref.get_state())
