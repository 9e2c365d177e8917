"""One process of the expert-parallel tests, started by ``test_parallel.py``.

Run as ``python ep_worker.py CASE OUT SETTINGS_JSON`` with the rendezvous in the
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), as torchrun
would set it; it writes its results to ``OUT/rank{RANK}.*`` for the test to compare.
Results travel as safetensors and JSON, never pickle.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moekit._core.distributed import close_group
from moekit.nn import MoE
from moekit.nn.parallel import CollectiveError, init_distributed

DTYPE = torch.float64


def build_layer(s: dict, group=None) -> MoE:
    """The layer of settings ``s``, from its seed, in float64 (the test builds it alike)."""
    torch.manual_seed(s["seed"])
    layer = MoE(s["d"], s["h"], s["E"], s["k"], router=s["router"],
                capacity_factor=s.get("capacity"), n_shared_experts=s.get("shared", 0),
                expert_impl=s.get("impl", "auto"), expert_parallel_group=group)  # fmt: skip
    layer = layer.to(DTYPE)
    if s.get("idle_experts"):  # experts no token may choose (sigmoid_bias router)
        layer.router.bias[s["idle_experts"]] = -1e3
    return layer


def data(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """All processes' tokens and upstream gradients, concatenated by rank."""
    gen = torch.Generator().manual_seed(s["seed"] + 1)
    n = sum(s["sizes"])
    return (torch.randn(n, s["d"], generator=gen, dtype=DTYPE),
            torch.randn(n, s["d"], generator=gen, dtype=DTYPE))  # fmt: skip


def rows(s: dict, rank: int) -> slice:
    start = sum(s["sizes"][:rank])
    return slice(start, start + s["sizes"][rank])


def case_layer(s: dict, rank: int, out: Path) -> None:
    layer = build_layer(s, dist.group.WORLD)
    x_all, g_all = data(s)
    x = x_all[rows(s, rank)].clone().requires_grad_()
    y = layer(x)
    (y * g_all[rows(s, rank)]).sum().backward()
    grads = {f"grad.{n}": p.grad for n, p in layer.named_parameters() if p.grad is not None}
    counts = layer.stats.tokens_per_expert
    results = {"y": y.detach(), "x_grad": x.grad, "tokens_per_expert": counts, **grads}
    save_file(results, out / f"rank{rank}.safetensors")
    try:  # 3 experts over 2 processes
        MoE(s["d"], s["h"], 3, 1, expert_parallel_group=dist.group.WORLD)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    (out / f"rank{rank}.json").write_text(json.dumps({"refused": refused}))


def case_train(s: dict, rank: int, out: Path) -> None:
    """Train a small language model data + expert parallel; optionally die at a step."""
    from moekit.nn import MoETransformer, TrainConfig, TransformerConfig, train_lm
    from moekit.nn import train as train_module

    fail_at = s.get("fail_at")
    if fail_at is not None and rank == 1:
        lm_loss, calls = train_module._lm_loss, [0]

        def failing(*args):  # process 1 dies (or hangs) in forward number fail_at
            calls[0] += 1
            if calls[0] > fail_at:
                if s.get("hang"):
                    time.sleep(3600)
                os._exit(3)
            return lm_loss(*args)

        train_module._lm_loss = failing
    torch.manual_seed(s["seed"])
    model = MoETransformer(TransformerConfig(**s["model"]))
    text = Path(s["corpus"]).read_text() if "corpus" in s else ""
    tick = time.perf_counter()
    result = {}
    try:
        log = train_lm(
            model,
            text,
            TrainConfig(**s["train"]),
            verbose=0,
            checkpoint=out / "checkpoint.safetensors",
        )
        result["train_loss"] = log.train_loss
        result["val_loss"] = log.val_loss
    except CollectiveError as exc:
        result["error"] = str(exc)
    result["seconds"] = time.perf_counter() - tick
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if "error" not in result:
        _logits(model, s, rank, out)


def _logits(model, s: dict, rank: int, out: Path) -> None:
    """The model, sharded over the processes, on fixed inputs (each process its rows)."""
    from moekit.nn.sharding import shard_experts

    shard_experts(model)
    idx = torch.randint(0, 256, (4, s["model"]["block_size"]),
                        generator=torch.Generator().manual_seed(7))  # fmt: skip
    part = idx.tensor_split(dist.get_world_size())[rank]
    with torch.no_grad():
        logits, _ = model.eval()(part)
    save_file({"logits": logits}, out / f"rank{rank}.safetensors")
    try:  # a model file must hold every expert
        model.save(out / f"rank{rank}.moe")
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    (out / f"rank{rank}.save.json").write_text(json.dumps({"refused": refused}))


def case_load(s: dict, rank: int, out: Path) -> None:
    """Load a checkpoint written by another number of processes and run it sharded."""
    from moekit.nn.checkpoint import load_lm

    _logits(load_lm(s["checkpoint"]), s, rank, out)


def main() -> None:
    case, out, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)  # the processes share the machine's cores
    rank, _ = init_distributed(timeout_s=settings.get("timeout", 30.0))
    try:
        {"layer": case_layer, "train": case_train, "load": case_load}[case](settings, rank, out)
    finally:  # on every path, before the interpreter finalises
        close_group()


if __name__ == "__main__":
    main()
