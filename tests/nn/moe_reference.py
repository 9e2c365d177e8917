"""Plain per-token reference implementations the MoE layer is tested against.

Written for clarity, not speed: one token and one expert at a time, no sorting, no
gather/scatter, so that they share no code path with the layer's dispatch.
"""

import torch

from moekit.nn.experts import activate


def expert_ffn(bank, e, x_row):
    """Expert ``e`` of ``bank`` on one token of shape (d_model,)."""
    h = activate(x_row @ bank.w_in[e], bank.activation)
    return h @ bank.w_out[e]


def reference_moe(layer, x, routing, capacity=None, priority="choice"):
    """The MoE output for tokens ``x`` (T, d) under ``routing``, token by token.

    Token choice with a capacity lets each expert take ``capacity`` assignments,
    visiting all first choices (in token order, or by decreasing weight with
    ``priority='weight'``), then all second choices, and so on.
    """
    n_tokens = x.shape[0]
    out = [x.new_zeros(x.shape[-1]) for _ in range(n_tokens)]
    bank = layer.experts
    if routing.expert_choice:
        n_experts, n_chosen = routing.indices.shape
        for e in range(n_experts):
            for c in range(n_chosen):
                t = int(routing.indices[e, c])
                out[t] = out[t] + routing.weights[e, c].to(x.dtype) * expert_ffn(bank, e, x[t])
    else:
        used = [0] * layer.n_experts
        for j in range(routing.indices.shape[1]):
            tokens = list(range(n_tokens))
            if priority == "weight":
                tokens.sort(key=lambda t: -float(routing.weights[t, j].detach()))
            for t in tokens:
                e = int(routing.indices[t, j])
                if capacity is not None and used[e] >= capacity:
                    continue
                used[e] += 1
                w = routing.weights[t, j].to(x.dtype)
                out[t] = out[t] + w * expert_ffn(bank, e, x[t])
    y = torch.stack(out) if out else x.new_zeros(0, x.shape[-1])
    if layer.shared is not None:
        y = y + torch.stack([layer.shared(x[t]) for t in range(n_tokens)])
    return y
