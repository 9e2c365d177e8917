"""Train a tiny byte-level MoE language model on a paragraph and sample from it
============================================================================

Each feed-forward block of the transformer is a sparse MoE layer (8 experts, top-2).
The script prints the held-out loss that ``train_lm`` logs, how evenly the experts of
the first layer share the tokens, and a greedy sample. Runs in about 20 seconds on
two CPU cores. (``moekit lm train`` does the same on a whole file.)

Run: ``python examples/nn_tiny_lm.py``
"""

import torch

from moekit.nn import MoETransformer, TrainConfig, train_lm
from moekit.nn.train import byte_tokens, decode_bytes

TEXT = (
    "A mixture of experts splits the input space between experts and lets a gate "
    "decide which expert speaks for each input. Sparse layers keep only the top few "
    "experts for each token, so that the parameters grow while the compute per token "
    "stays the same. "
) * 8

torch.manual_seed(0)
model = MoETransformer(
    vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=64, d_hidden=64,
    n_experts=8, top_k=2,
)  # fmt: skip
log = train_lm(model, TEXT, TrainConfig(steps=300, eval_every=50, batch_size=16), verbose=0)
for step, loss in zip(log.eval_step, log.val_loss, strict=True):
    print(f"step {step:3d}: held-out loss {loss:.3f} nats per byte")
stats = model.moe_layers()[0].stats
print(f"first layer: balance {stats.balance:.2f}, tokens/expert {stats.tokens_per_expert.tolist()}")
prompt = byte_tokens("Sparse layers").unsqueeze(0)
print(decode_bytes(model.generate(prompt, max_new_tokens=80, temperature=0.0)[0].tolist()))
