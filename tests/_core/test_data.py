"""Chunks and their weighted Gram matrices: both paths against a direct sum."""

import itertools

import pytest
import torch

import moekit._core.data as data_mod
from moekit._core.data import EMData, unpack_grams

PACKED, PER_WEIGHT = 10**6, 0  # values of PACKED_MAX_P that force each path


def _data(n, p, m, shared=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    XeT = torch.randn(p, n, generator=gen, dtype=torch.float64)
    XeT[-1] = 1.0
    XgT = XeT if shared else torch.randn(p - 2, n, generator=gen, dtype=torch.float64)
    y = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return EMData(XeT, XgT, y)


def _summed(data, weights, which, with_target):
    total = None
    for chunk in data.chunks(1000):  # several chunks, the last one shorter
        part = chunk.weighted_grams(weights[:, chunk.start : chunk.stop], which, with_target)
        total = part if total is None else total + part
    return total


@pytest.mark.parametrize("path", [PACKED, PER_WEIGHT])
@pytest.mark.parametrize("m", [1, 2])
def test_weighted_grams_are_the_weighted_sums(monkeypatch, path, m):
    monkeypatch.setattr(data_mod, "PACKED_MAX_P", path)
    n, p = 2500, 6
    data = _data(n, p, m)
    w = torch.rand(4, n, dtype=torch.float64) - 0.3  # some weights negative, as the gate's
    X, y = data.XeT.T, data.y.T  # (n, p), (n, m)
    gram, xty, yty = unpack_grams(_summed(data, w, "e", True), p, m)
    torch.testing.assert_close(gram, torch.einsum("tn,na,nb->tab", w, X, X), rtol=1e-12, atol=0)
    torch.testing.assert_close(xty, torch.einsum("tn,nj,na->tja", w, y, X), rtol=1e-12, atol=0)
    torch.testing.assert_close(yty, torch.einsum("tn,nj->tj", w, y * y), rtol=1e-12, atol=0)
    assert torch.equal(gram, gram.transpose(1, 2))


@pytest.mark.parametrize("shared", [True, False])
def test_both_paths_give_the_same_gate_and_expert_grams(monkeypatch, shared):
    data = _data(3000, 8, 1, shared=shared)
    w = torch.rand(3, 3000, dtype=torch.float64)
    out = {}
    for path in (PACKED, PER_WEIGHT):
        monkeypatch.setattr(data_mod, "PACKED_MAX_P", path)
        data._work.clear()
        e = unpack_grams(_summed(data, w, "e", True), 8, 1)
        g = unpack_grams(_summed(data, w, "g", False), data.XgT.shape[0])[0]
        out[path] = (*e, g)
    for a, b in zip(out[PACKED], out[PER_WEIGHT], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_chunks_keep_their_scratch_bounded_and_cover_the_rows():
    narrow = _data(200_000, 6, 1)
    assert narrow.chunk_rows() == data_mod.DEFAULT_CHUNK  # narrow data: chunks as before
    wide = _data(5000, 201, 1)
    rows = wide.chunk_rows()
    scratch = rows * data_mod.gram_scratch_rows(201, 1) * 8
    assert data_mod.MIN_CHUNK <= rows < data_mod.DEFAULT_CHUNK
    assert scratch <= data_mod.CHUNK_SCRATCH_BYTES
    spans = [(c.start, c.stop) for c in wide.chunks()]
    assert spans[0][0] == 0 and spans[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    # the gate's own design, when it differs, counts too
    assert _data(5000, 201, 1, shared=False).chunk_rows() < rows


def test_wide_designs_use_no_packed_products():
    data = _data(4000, 40, 1)
    assert not data_mod.packed(40)
    w = torch.rand(3, 4000, dtype=torch.float64)
    for chunk in data.chunks():
        assert chunk.weighted_grams(w[:, chunk.start : chunk.stop], "e", True).shape == (3, 41, 41)
    assert not any(key.startswith("prod") for key in data._work)


def test_one_chunk_keeps_its_products_and_gives_the_same_grams(monkeypatch):
    # 40 columns: per-weight Grams, unless the data are one chunk whose products are
    # kept for the fit; both give the same sums, and the kept products are built once
    n, p = 600, 40
    data = _data(n, p, 1)
    w = torch.rand(20, n, dtype=torch.float64)
    X = data.XeT.T
    want = torch.einsum("tn,na,nb->tab", w, X, X)
    muls = []
    real_mul = torch.mul
    monkeypatch.setattr(torch, "mul", lambda *a, **k: muls.append(1) or real_mul(*a, **k))
    for _ in range(3):  # three passes over one chunk
        (chunk,) = data.chunks()
        stats = chunk.weighted_grams(w, "e")
        assert stats.ndim == 2  # packed layout
        torch.testing.assert_close(unpack_grams(stats, p)[0], want, rtol=1e-12, atol=1e-12)
    assert len(muls) == p  # one product row block per column, in the first pass only
    # other rows' products overwrite the buffer: the whole chunk's are built again
    torch.testing.assert_close(unpack_grams(_summed(data, w, "e", False), p)[0], want,
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    (chunk,) = data.chunks()
    torch.testing.assert_close(unpack_grams(chunk.weighted_grams(w, "e"), p)[0], want,
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    # few weights on products that leave the cache: one product per weight
    monkeypatch.setattr(data_mod, "CACHED_PRODUCTS_BYTES", 0)
    assert chunk.weighted_grams(w[:3], "e").shape == (3, p, p)


@pytest.mark.parametrize("case", ["packed", "kept", "per weight"])
def test_curvature_grams_are_the_weighted_grams_to_float32_rounding(monkeypatch, case):
    n, p = 600, 40
    if case == "packed":
        monkeypatch.setattr(data_mod, "PACKED_MAX_P", PACKED)
    if case == "per weight":
        monkeypatch.setattr(data_mod, "KEPT_PRODUCTS_BYTES", 0)
    data = _data(n, p, 1)
    w = torch.rand(20, n, dtype=torch.float64)
    want = torch.einsum("tn,na,nb->tab", w, data.XeT.T, data.XeT.T)
    for _ in range(2):  # the kept float32 products serve the second pass too
        (chunk,) = data.chunks()
        got = chunk.curvature_grams(w, "e")
        assert got.dtype == torch.float64
        assert got.shape == chunk.weighted_grams(w, "e").shape
        gram = unpack_grams(got, p)[0]
        if case == "packed":  # narrow designs keep float64
            torch.testing.assert_close(gram, want, rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(gram, want, rtol=1e-5, atol=1e-4)
            assert not torch.equal(gram, want)  # float32 products, not a float64 fallback
    assert ("prod:e:float32" in data._work) == (case == "kept")
