"""Train a tiny byte-level MoE language model on a paragraph and sample from it.

Each feed-forward block of the transformer is a sparse MoE layer (8 experts, top-2).
The script prints the training loss and how evenly the experts of the first layer
share the tokens, then a greedy sample. Runs in about 20 seconds on two CPU cores.

Run: python examples/nn_tiny_lm.py
"""

import torch

from moekit.nn import MoETransformer

TEXT = (
    "A mixture of experts splits the input space between experts and lets a gate "
    "decide which expert speaks for each input. Sparse layers keep only the top few "
    "experts for each token, so that the parameters grow while the compute per token "
    "stays the same. "
) * 4

torch.manual_seed(0)
data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
model = MoETransformer(
    vocab_size=256,
    block_size=64,
    n_layer=2,
    n_head=4,
    d_model=64,
    d_hidden=64,
    n_experts=8,
    top_k=2,
)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(301):
    start = torch.randint(0, len(data) - 65, (16,))
    batch = torch.stack([data[s : s + 65] for s in start])  # (16, 65)
    _, loss = model(batch[:, :-1], targets=batch[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        stats = model.moe_layers()[0].stats
        print(
            f"step {step:3d}  loss {loss.item():.3f}  first layer: balance "
            f"{stats.balance:.2f}, tokens/expert {stats.tokens_per_expert.tolist()}"
        )

model.eval()
prompt = torch.tensor([list(b"Sparse layers")])
out = model.generate(prompt, max_new_tokens=80, temperature=0.0)
print(bytes(out[0].tolist()).decode(errors="replace"))
