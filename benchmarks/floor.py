"""The hardware floor: the best matmul rates this machine reaches (square and at the model's own shapes),
and the FLOPs a token of extraction costs, so that a rate can be read as a share of what is possible."""

from __future__ import annotations

import torch

from assistant_axis.models import find_blocks
from benchmarks.harness import Table, best_of


class Rates:
    """Best matmul rates seen so far, FLOP/s, by name; later bursts can only raise them, so the floor is
    never flattered by a slow spell."""

    def __init__(self):
        self.best: dict[str, float] = {}

    def note(self, name: str, rate: float) -> None:
        self.best[name] = max(self.best.get(name, 0.0), rate)

    def measure(self, model, repeat: int) -> None:
        self.note("fp32 2048^3", matmul_burst(torch.float32, 2048, repeat))
        self.note("fp32 model shapes", shape_burst(model, torch.float32, 2048, repeat))
        # Without bf16 units torch falls back to a slow kernel (1-10 GFLOP/s): then measure small sizes.
        fast = (
            self.best.get("bf16 2048^3", 0.0) > 0 or matmul_burst(torch.bfloat16, 256, 1) > self.best["fp32 2048^3"] / 2
        )
        if fast:
            self.note("bf16 2048^3", matmul_burst(torch.bfloat16, 2048, repeat))
            self.note("bf16 model shapes", shape_burst(model, torch.bfloat16, 2048, repeat))
        else:
            self.note("bf16 512^3", matmul_burst(torch.bfloat16, 512, max(2, repeat // 5)))
            self.note("bf16 model shapes", shape_burst(model, torch.bfloat16, 256, max(2, repeat // 5)))

    def floor(self, dtype: str) -> float:
        """The fastest matmul measured for the dtype, whichever form it was."""
        return max(v for k, v in self.best.items() if k.startswith(dtype))


def matmul_burst(dtype: torch.dtype, n: int, repeat: int) -> float:
    """FLOP/s of an n x n x n matmul, best of `repeat` single products (after a warm-up), in the better of
    two layouts: `a @ b`, and `a @ b.T` as nn.Linear multiplies (without bf16 units torch's fallback
    kernel is about 10x faster in the second)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b, a @ b.T
    seconds, _ = best_of({"a @ b": lambda: a @ b, "a @ b.T": lambda: a @ b.T}, repeat)
    return 2 * n**3 / min(seconds.values())


def shape_burst(model, dtype: torch.dtype, rows: int, repeat: int) -> float:
    """FLOP/s of the matmuls of one decoder block at `rows` tokens, with the shapes of the model's weights."""
    linears = [m for m in find_blocks(model)[0].modules() if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach().to(dtype) for m in linears]
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}

    def block():
        for m, w in zip(linears, weights, strict=True):
            torch.nn.functional.linear(inputs[m.in_features], w)

    block()
    seconds, _ = best_of({"block": block}, repeat)
    return 2 * rows * sum(w.numel() for w in weights) / seconds["block"]


def flops_per_token(model, layers: int, seqs: list[list[int]]) -> tuple[float, float, float]:
    """(matmul, attention) FLOPs per token of a forward through the first `layers` blocks.

    Matmuls: 2 x the weights of every nn.Linear in those blocks (embedding lookup, norms and the LM
    head, which extraction never runs, are not counted). Attention: per block and token at position
    t, 2 x d x t for the scores and 2 x d x t for the weighted values with d = heads x head size, i.e.
    2 x d x (sum T^2 / sum T) per token over these sequences (causal: half of the T x T products).
    Third: that mean context, sum T^2 / sum T.
    """
    blocks = find_blocks(model)[:layers]
    matmul = 2 * sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config.get_text_config()
    d = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    mean_context = sum(len(s) ** 2 for s in seqs) / sum(len(s) for s in seqs)
    return matmul, 2 * len(blocks) * d * mean_context, mean_context


def run(model, repeat: int, rates: Rates, table: Table) -> None:
    rates.measure(model, repeat)
    for name, rate in rates.best.items():
        table.report(f"matmul {name}", f"{rate / 1e9:.1f} GFLOP/s", f"best of {repeat}" if "fp32" in name else "")
