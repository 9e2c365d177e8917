"""The family of the user guide's "Write your own family" section fits and recovers truth.

``shared_variance.py`` is the guide's example, shown there as it stands here; this
test is the guide's fitting code, and checks the family against the contract, that
EM's objective never decreases, and that the fit recovers the generating lines and
noise level.
"""

import itertools

import contract_checks as checks
import torch
from shared_variance import SharedVarianceExperts


def test_shared_variance_experts_recover_known_lines():
    from moekit._core.data import EMData
    from moekit.experts.base import ExpertFamily
    from moekit.fitting.em import run_em
    from moekit.fitting.model import EMModel
    from moekit.gates.softmax import SoftmaxGate

    # two regimes, switched smoothly by x, with one noise level: y = 1 + 2x or -1 - x
    gen = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    first = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(3.0 * x)
    y = torch.where(first, 1.0 + 2.0 * x, -1.0 - 1.0 * x)
    y = y + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)

    # designs are feature-major with the intercept as the last row; y is (m, n)
    XT = torch.stack([x, torch.ones(n, dtype=torch.float64)])
    data = EMData(XT, XT, y.unsqueeze(0))
    experts = SharedVarianceExperts(n_experts=2)
    assert checks.protocol_problems(experts, ExpertFamily) == []

    model = EMModel(experts, SoftmaxGate(2))
    fit = run_em(model, data, n_init=3, max_iter=500, tol=1e-10, init_max_iter=20,
                 init_sample_size=None, generator=torch.Generator().manual_seed(0))  # fmt: skip

    assert fit.converged
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(fit.history))  # EM never goes down
    coef = fit.params.expert.coef[torch.argsort(fit.params.expert.coef[:, 1])]  # by intercept
    truth = torch.tensor([[-1.0, -1.0], [2.0, 1.0]], dtype=torch.float64)  # (slope, intercept)
    torch.testing.assert_close(coef, truth, atol=0.05, rtol=0)
    assert abs(float(fit.params.expert.var[0].sqrt()) - 0.3) < 0.015
