"""A chunk's design is padded to the alignment once per fit, and the numbers stay."""

import gc

import pytest
import torch

from moekit._core import alignment
from moekit._core.alignment import ALIGN, aligned_rows
from moekit._core.batch import design_sums, times_design
from moekit._core.data import EMData


def _data(p, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    XT = torch.cat([torch.randn((p - 1, n), generator=gen, dtype=torch.float64),
                    torch.ones((1, n), dtype=torch.float64)])  # fmt: skip
    return EMData(XT, XT, torch.randn((1, n), generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("n", [97, 150, 152])
def test_a_chunk_design_is_padded_once_and_as_before(n):
    data = _data(3, n)
    first = aligned_rows(next(data.chunks()).XeT)
    again = aligned_rows(next(data.chunks()).XeT)  # the next pass's chunk
    fresh = torch.nn.functional.pad(data.XeT, (0, -n % ALIGN))
    assert torch.equal(first, fresh)
    assert first.shape[-1] % ALIGN == 0
    if n % ALIGN:
        assert again is first  # made once, kept with the design
    # the same numbers as products with a design padded afresh (a copy is not registered)
    gen = torch.Generator().manual_seed(1)
    coef = torch.randn((4, 2, 3), generator=gen, dtype=torch.float64)
    w = torch.rand((4, 2, n), generator=gen, dtype=torch.float64)
    xt, copy = next(data.chunks()).XeT, data.XeT.clone()
    assert torch.equal(times_design(coef, xt), times_design(coef, copy))
    assert torch.equal(design_sums(w, xt), design_sums(w, copy))


def test_other_tensors_are_padded_afresh_and_kept_copies_go_with_their_data():
    weights = torch.rand((2, 3, 97), dtype=torch.float64)
    assert aligned_rows(weights) is not aligned_rows(weights)  # written between calls
    data = _data(2, 97)
    aligned_rows(next(data.chunks()).XeT)
    assert any(root is data.XeT for root in alignment._DESIGNS.keys())
    before = len(alignment._DESIGNS)
    del data
    gc.collect()
    assert len(alignment._DESIGNS) == before - 1
