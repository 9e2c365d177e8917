"""The E-step's log-sum-exp pass: one expert's shortcut gives the general pass's floats."""

import math

import torch

from moekit.fitting.model import posterior


def _general(joint, dim):
    # the pass for any number of experts, written out
    top = joint.amax(dim, keepdim=True)
    resp = (joint - top).exp()
    s = resp.sum(dim, keepdim=True)
    return resp / s, torch.log(s) + top


def test_one_expert_gives_the_general_pass_s_floats():
    gen = torch.Generator().manual_seed(0)
    odd = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-310], dtype=torch.float64)
    values = torch.cat([300 * torch.randn(40, generator=gen, dtype=torch.float64), odd])
    for shape, dim in (((1, values.numel()), 0), ((2, 1, values.numel() // 2), 1)):
        joint = values.reshape(shape)
        resp, row_ll = posterior(joint.clone(), dim)
        ref_resp, ref_ll = _general(joint, dim)
        assert resp.shape == ref_resp.shape and row_ll.shape == ref_ll.shape
        # the same floats, NaN where the general pass gives NaN, and the sign of zero
        for ours, ref in ((resp, ref_resp), (row_ll, ref_ll)):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
            real = ~torch.isnan(ref)
            assert torch.equal(torch.signbit(ours[real]), torch.signbit(ref[real]))


def test_several_experts_normalise_in_one_pass():
    gen = torch.Generator().manual_seed(1)
    joint = 50 * torch.randn((3, 4, 25), generator=gen, dtype=torch.float64)
    resp, row_ll = posterior(joint.clone(), 1)
    torch.testing.assert_close(row_ll, torch.logsumexp(joint, 1, keepdim=True))
    torch.testing.assert_close(resp, torch.softmax(joint, 1))
