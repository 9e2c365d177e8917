"""A sparse MoE layer in place of a feed-forward block, trained on a toy task
==========================================================================

The target is a different linear map in each quadrant of the first two inputs.
Four experts with a learned router split the quadrants between them; the script
prints the loss, the auxiliary balancing loss and the routing statistics the layer
keeps after each forward pass, then which expert each quadrant ended up with.

Run: ``python examples/nn_moe_layer.py``
"""

import torch

from moekit.nn import MoE

torch.manual_seed(0)
d = 8
maps = torch.randn(4, d, d)  # one linear map per quadrant


def batch(n):
    x = torch.randn(n, d)
    quadrant = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    return x, torch.einsum("nij,nj->ni", maps[quadrant], x), quadrant


layer = MoE(d_model=d, d_hidden=16, n_experts=4, top_k=2, activation="gelu", z_loss_coef=1e-3)
opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
for step in range(501):
    x, y, _ = batch(256)
    loss = (layer(x) - y).square().mean()
    opt.zero_grad()
    (loss + layer.aux_loss).backward()  # the layer's balancing + z loss, from this forward
    opt.step()
    if step % 100 == 0:
        s = layer.stats
        print(
            f"step {step:3d}  mse {loss.item():.3f}  aux {layer.aux_loss.item():.4f}  "
            f"tokens/expert {s.tokens_per_expert.tolist()}  balance {s.balance:.2f}"
        )

x, y, quadrant = batch(4096)
with torch.no_grad():
    routing = layer.router(x)
for q in range(4):
    top = routing.indices[quadrant == q, 0]  # each token's first choice
    share = torch.bincount(top, minlength=4).float() / len(top)
    print(f"quadrant {q}: first-choice share per expert {[round(v, 2) for v in share.tolist()]}")
