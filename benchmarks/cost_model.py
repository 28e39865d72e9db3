"""How fast could one edit batch run on an H100? A roofline cost model, stage by stage.

    python benchmarks/cost_model.py                  # ENCORE preset llama3-8b, batch 100, 12 steps
    python benchmarks/cost_model.py --steps 25       # no MPES: every request runs 25 steps
    python benchmarks/cost_model.py --out benchmarks/results/cost_model_h100.md --csv

Nothing runs on a GPU and nothing is allocated: a Llama3-8B-shaped ``LlamaForCausalLM`` is
built on the meta device, and ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul
FLOPs of its decoder blocks (eager attention, so the score and value matmuls are included) and
of its LM head on meta tensors of the token counts each stage runs. Backward passes are counted
the same way, by autograd on the meta block with frozen weights: only input gradients
(dX = dY·Wᵀ, one matmul the size of the forward's per linear layer: factor 1×, not the usual
2×, because no weight gradient dW is formed); the attention matmuls need both operands'
gradients (2×). Attention of new tokens to a *cached* prefix (the fast engine) is added
analytically: 4·heads·head_dim·q·p forward, the same backward (no gradients for constants).

Bytes are analytic (bf16 model, 2 B per element)::

    pass bytes = passes·blocks·params_block·2            weights read once per forward call
               + blocks·tokens·Σ_linear(in + out)·2      each linear reads its input, writes
                                                         its output once (elementwise fused)
               + blocks·cached·2·kv_dim·2                cached prefix keys/values read
    backward   = the same weights read again + 2× the activation bytes (saved input + gradient)
    LM head    = vocab·d·2 + positions·(d + vocab)·2 (×2 activations backward)

The solve, apply and statistics stages state their own formulas below. The floor of a stage is
max(FLOPs / peak, bytes / 3.35 TB/s) — a roofline lower bound, never reachable exactly: no
launch or Python overhead, no softmax traffic, perfect overlap of compute and memory.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from encore_fast.config import PRESETS, EditConfig
from encore_fast.values.prompts import KL_PROMPTS

PEAK = {"bf16": 989e12, "fp32": 67e12, "fp64": 67e12}  # H100 SXM datasheet, dense FLOP/s
HBM = 3.35e12  # B/s
BF16, FP32, FP64 = 2, 4, 8
PRESET = EditConfig(**PRESETS["llama3-8b"]["encore"])
N_CTX = len(PRESET.context_words)  # prefixed rewrite prompts; + the raw prompt
N_KL = len(KL_PROMPTS)
KL_AFTER = 2  # KL prompt tokens after its last subject token ("is a")


def llama3_8b_config() -> LlamaConfig:
    """Llama3-8B's shape (eager attention, so FlopCounterMode sees the attention matmuls)."""
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       attn_implementation="eager")


def _opt(default: object, text: str) -> Any:
    """A field with its help text (printed with the assumptions and by ``--help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class Assumptions:
    """Workload of one batch; token counts are typical CounterFact values (Llama3 tokenizer)."""

    batch: int = _opt(PRESET.batch_size, "edits per batch")
    steps: float = _opt(12.0, "mean value steps (forward passes) per request: ENCORE with "
                              "MPES ≈ 12, 25 without")
    max_steps: int = _opt(PRESET.v_num_grad_steps, "packed steps the fast engine's batch loop "
                                                   "runs (its slowest request)")
    prompt: int = _opt(20, "rewrite prompt tokens (BOS and subject included, no target)")
    prefix: int = _opt(PRESET.context_length, "context prefix tokens (5 generated contexts)")
    target: int = _opt(3, "target tokens")
    suffix: int = _opt(5, "prompt tokens from the last subject token on")
    kl: int = _opt(7, "KL prompt '{subject} is a' tokens (read at the last subject token)")
    chunk: int = _opt(64, "prompts per key-pass forward")
    stats_batch: int = _opt(8, "texts per statistics forward")
    stats_len: int = _opt(PRESET.stats_max_length, "tokens per statistics text (all full)")
    stats_texts: int = _opt(PRESET.stats_samples, "statistics texts (preset llama3-8b)")
    layers: list[int] = _opt(list(PRESET.layers), "edited layers (preset llama3-8b)")


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes moved."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> Work:
        return Work(self.flops * k, self.bytes * k)


@dataclass(frozen=True)
class Seg:
    """``count`` sequences of ``q`` tokens run now, each attending to ``p`` cached tokens."""

    count: int
    q: int
    p: int = 0


@dataclass
class Row:
    """One stage of one engine, and its roofline floor."""

    stage: str
    engine: str
    work: Work
    peak: str = "bf16"
    in_total: bool = True  # part of the batch total (not a per-step or once-per-model row)

    @property
    def compute_s(self) -> float:
        return self.work.flops / PEAK[self.peak]

    @property
    def memory_s(self) -> float:
        return self.work.bytes / HBM

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


class MetaModel:
    """The meta-device model: counted FLOPs of one decoder block and of the LM head."""

    def __init__(self, config: LlamaConfig) -> None:
        with torch.device("meta"):
            self.model = LlamaForCausalLM(config).to(torch.bfloat16)
        self.model.requires_grad_(False)
        self.block = self.model.model.layers[0]
        c = config
        self.n_layers, self.d, self.vocab = c.num_hidden_layers, c.hidden_size, c.vocab_size
        self.heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.kv_dim = c.num_key_value_heads * self.head_dim
        self.d_in = c.intermediate_size  # down_proj input: the keys
        linears = [m for m in self.block.modules() if isinstance(m, nn.Linear)]
        self.linear_params = sum(m.weight.numel() for m in linears)
        self.block_params = sum(p.numel() for p in self.block.parameters())
        self.act_per_token = BF16 * sum(m.in_features + m.out_features for m in linears)
        self._memo: dict[tuple, float] = {}

    def _count(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               backward: bool) -> float:
        """FlopCounterMode's total for ``fn(x)``, or for its backward (dY like the output)."""
        with FlopCounterMode(display=False) as fwd:
            y = fn(x)
        if not backward:
            return float(fwd.get_total_flops())
        with FlopCounterMode(display=False) as bwd:
            y.backward(torch.empty_like(y))
        return float(bwd.get_total_flops())

    def block_flops(self, rows: int, seq: int, backward: bool = False) -> float:
        """Counted FLOPs of one decoder block on ``[rows, seq]`` tokens (forward or backward)."""
        key = ("block", rows, seq, backward)
        if key not in self._memo:
            x = torch.empty(rows, seq, self.d, device="meta", dtype=torch.bfloat16,
                            requires_grad=backward)
            pos = torch.arange(seq, device="meta")[None].expand(rows, -1)
            rope = self.model.model.rotary_emb(x, pos)
            self._memo[key] = self._count(
                lambda h: self.block(h, position_ids=pos, position_embeddings=rope), x, backward)
        return self._memo[key]

    def head_flops(self, positions: int, backward: bool = False) -> float:
        """Counted FLOPs of the LM head at ``positions`` tokens."""
        key = ("head", positions, backward)
        if key not in self._memo:
            x = torch.empty(positions, self.d, device="meta", dtype=torch.bfloat16,
                            requires_grad=backward)
            self._memo[key] = self._count(self.model.lm_head, x, backward)
        return self._memo[key]

    def prefix_attention(self, q: int, p: int) -> float:
        """Analytic FLOPs of ``q`` queries attending to ``p`` cached keys (QKᵀ and PV)."""
        return 4.0 * self.heads * self.head_dim * q * p


# -- passes ------------------------------------------------------------------------------------
def blocks(m: MetaModel, segs: list[Seg], n_blocks: int, backward: bool = False,
           passes: int = 1) -> Work:
    """``n_blocks`` decoder blocks over ``segs``, their weights read ``passes`` times."""
    flops = sum(m.block_flops(s.count, s.q, backward) + s.count * m.prefix_attention(s.q, s.p)
                for s in segs)
    tokens = sum(s.count * s.q for s in segs)
    cached = sum(s.count * s.p for s in segs)
    acts = tokens * m.act_per_token * (2 if backward else 1) + cached * 2 * m.kv_dim * BF16
    return Work(flops, passes * m.block_params * BF16 + acts) * n_blocks


def head(m: MetaModel, positions: int, backward: bool = False) -> Work:
    """The LM head at ``positions`` tokens."""
    acts = positions * (m.d + m.vocab) * BF16 * (2 if backward else 1)
    return Work(m.head_flops(positions, backward), m.vocab * m.d * BF16 + acts)


# -- stages ------------------------------------------------------------------------------------
def values_reference(m: MetaModel, a: Assumptions) -> tuple[Work, Work, Work]:
    """Per request, per step: the 6 rewrite + KL prompts padded to the longest, all blocks,
    full-vocabulary logits everywhere; backward through the blocks after l_m and the head.
    Returns (one step of every request, once per batch, total): ``steps`` forwards and
    ``steps − 1`` backwards per request (no backward on the step that stops)."""
    seq = a.prefix + a.prompt + a.target - 1
    rows = [Seg(N_CTX + 1 + N_KL, seq)]
    after = m.n_layers - a.layers[-1] - 1
    fwd = blocks(m, rows, m.n_layers) + head(m, rows[0].count * seq)
    bwd = blocks(m, rows, after, True) + head(m, rows[0].count * seq, True)
    total = (fwd * a.steps + bwd * (a.steps - 1)) * a.batch
    return (fwd + bwd) * a.batch, Work(), total


def values_fast(m: MetaModel, a: Assumptions) -> tuple[Work, Work, Work]:
    """Once per batch: the shared context prefixes, each prompt's own prefix (all blocks, no
    gradient) and the suffixes through blocks ≤ l_m. Per step: only the suffixes (from the last
    subject token; a KL prompt's is its read token) through the blocks after l_m, logits only
    at the target and KL positions. FLOPs follow the mean ``steps``; the weights are read on
    each of the ``max_steps`` packed steps (the slowest request)."""
    n, pre, kl_pre = a.batch, a.prompt - a.suffix, a.kl - KL_AFTER - 1
    s = a.suffix + a.target - 1
    suffix = [Seg(N_CTX * n, s, a.prefix + pre), Seg(n, s, pre), Seg(N_KL * n, 1, kl_pre)]
    own = [Seg(N_CTX * n, pre, a.prefix), Seg(n, pre), Seg(N_KL * n, kl_pre)]
    after = m.n_layers - a.layers[-1] - 1
    once = (blocks(m, [Seg(N_CTX, a.prefix)], m.n_layers) + blocks(m, own, m.n_layers)
            + blocks(m, suffix, a.layers[-1] + 1))
    reads = n * ((N_CTX + 1) * a.target + N_KL)
    fwd = blocks(m, suffix, after) + head(m, reads)
    bwd = blocks(m, suffix, after, True) + head(m, reads, True)
    weights = (after * m.block_params + m.vocab * m.d) * BF16
    tail = Work(0.0, 2 * weights * max(0.0, a.max_steps - a.steps))
    return fwd + bwd, once, once + fwd * a.steps + bwd * (a.steps - 1) + tail


def keys(m: MetaModel, a: Assumptions, fast: bool) -> Work:
    """Per edited layer l_i: keys of the 6 prompts per request (forward to block l_i) and the
    raw prompts' output of block l_m, in chunks of ``chunk`` prompts. Reference: from block 0,
    whole prompts. Fast: prompts cut after the last subject token, and from the second layer on
    starting at block l_(i-1) from recorded hidden states."""
    n = a.batch
    cut = a.suffix - 1 if fast else 0
    rows, raw = Seg((N_CTX + 1) * n, a.prefix + a.prompt - cut), Seg(n, a.prompt - cut)
    work = Work()
    for i, layer in enumerate(a.layers):
        start = a.layers[i - 1] if fast and i else 0
        work += blocks(m, [rows], layer - start + 1, passes=math.ceil(rows.count / a.chunk))
        work += blocks(m, [raw], a.layers[-1] - start + 1, passes=math.ceil(n / a.chunk))
    return work


def solve(m: MetaModel, a: Assumptions, fast: bool) -> Work:
    """float64, per layer (d = d_in, passes = reads/writes of a d×d float64 matrix).
    Reference: A = λ_p C0 + λ_n I + S + KKᵀ (2d²n), LU (2/3·d³), n-column substitution (2d²n),
    S += KKᵀ (2d²n); passes: form A 3, LU 2, substitution 1, S 2.
    Woodbury: G = B⁻¹K (2d²n), KᵀG (2dn²), small Cholesky/solves (n³ + 3dn²), down-date
    B⁻¹ −= XᵀX (2d²n, fp64 GEMM), S += KKᵀ (2d²n); passes: G 1, down-date 2, S 2, drift probe
    every 10 batches 0.5."""
    d, n = m.d_in, a.batch
    if fast:
        flops, passes = 6.0 * d * d * n + 5.0 * d * n * n + n**3, 5.5
    else:
        flops, passes = 2.0 / 3.0 * d**3 + 6.0 * d * d * n, 8.0
    return Work(flops, passes * d * d * FP64) * len(a.layers)


def apply(m: MetaModel, a: Assumptions) -> Work:
    """W += U Vᵀ per layer (rank n, fp32 math on an fp32 master, bf16 model weight): 2·d_out·
    d_in·n FLOPs; bytes d_out·d_in·(2 + 2 + 4 + 4): bf16 W and fp32 master, read and written."""
    size = m.d * m.d_in
    return Work(2.0 * size * a.batch, size * (BF16 + BF16 + FP32 + FP32)) * len(a.layers)


def statistics(m: MetaModel, a: Assumptions, tokens: float) -> Work:
    """C0 in one early-exit pass over ``tokens``: forward to block l_m, and per edited layer a
    SYRK on the keys (upper tiles: d_in² FLOPs per token; keys read, fp32 sums read+written
    once per forward of ``stats_batch`` texts of ``stats_len`` tokens)."""
    per_pass = a.stats_batch * a.stats_len
    fwd = blocks(m, [Seg(a.stats_batch, a.stats_len)], a.layers[-1] + 1)
    syrk = Work(m.d_in**2 * per_pass, 2 * m.d_in**2 * FP32 + per_pass * m.d_in * BF16)
    return (fwd + syrk * len(a.layers)) * (tokens / per_pass)


def batch_rows(m: MetaModel, a: Assumptions) -> list[Row]:
    """Every stage of one batch for both engines, then the statistics (once per model)."""
    rows = []
    for engine, fast, values in (("reference", False, values_reference),
                                 ("fast", True, values_fast)):
        step, once, total = values(m, a)
        rows += [Row(f"values: one step ({a.batch} requests)", engine, step, in_total=False)]
        if fast:
            rows += [Row("values: once per batch", engine, once, in_total=False)]
        rows += [Row(f"values: {a.steps:g} steps", engine, total),
                 Row(f"keys ({len(a.layers)} layers)", engine, keys(m, a, fast)),
                 Row("solve (fp64)", engine, solve(m, a, fast), "fp64"),
                 Row("apply", engine, apply(m, a), "fp32")]
    corpus = a.stats_texts * a.stats_len
    rows += [Row("statistics: 1M tokens", "both", statistics(m, a, 1e6), in_total=False),
             Row(f"statistics: {a.stats_texts}×{a.stats_len} tokens", "both",
                 statistics(m, a, corpus), in_total=False)]
    return rows


def per_edit(rows: list[Row], engine: str, batch: int) -> float:
    """Seconds per edit: the sum of the batch stages' floors (statistics excluded)."""
    return sum(r.seconds for r in rows if r.engine == engine and r.in_total) / batch


# -- report ------------------------------------------------------------------------------------
def table(rows: list[Row]) -> list[list[str]]:
    """Table cells: stage, engine, GFLOP, GB, floor ms, bound."""
    return [[r.stage, r.engine, f"{r.work.flops / 1e9:,.1f}", f"{r.work.bytes / 1e9:,.2f}",
             f"{r.seconds * 1e3:,.2f}", r.bound] for r in rows]


def report(m: MetaModel, a: Assumptions, command: str) -> tuple[str, list[Row]]:
    """The Markdown report: command, assumptions, per-stage table, totals."""
    rows = batch_rows(m, a)
    ref, fast = per_edit(rows, "reference", a.batch), per_edit(rows, "fast", a.batch)
    head_rows = ["stage", "engine", "GFLOP", "GB", "floor ms", "bound"]
    lines = [f"# Cost model: one batch of {a.batch} edits, Llama3-8B shape, H100 floor", "",
             "```bash", command, "```", "", "## Assumptions", ""]
    lines += [f"- `--{f.name.replace('_', '-')}` = {getattr(a, f.name)}: {f.metadata['help']}"
              for f in fields(a)]
    seq = a.prefix + a.prompt + a.target - 1
    bwd = m.block_flops(N_CTX + 1 + N_KL, seq, True) / m.block_flops(N_CTX + 1 + N_KL, seq)
    lines += [
        f"- per request: {N_CTX} prefixed + 1 raw rewrite prompt, {N_KL} KL prompt; "
        f"{a.steps:g} forwards and {a.steps - 1:g} backwards (no backward on the stopping step)",
        f"- backward = autograd on the meta block with frozen weights: input gradients only "
        f"(linear 1×, attention matmuls 2×); counted block ratio {bwd:.3f}× at {seq} tokens",
        "- peaks: bf16 989 TFLOP/s (passes, SYRK), fp64 67 TFLOP/s (solve), fp32 67 TFLOP/s "
        "(apply: IEEE fp32 dot on the fp32 master); HBM 3.35 TB/s; "
        "floor = max(FLOPs/peak, bytes/HBM) per stage (a roofline lower bound)",
        f"- ridge points (FLOP per byte): bf16 {PEAK['bf16'] / HBM:.0f} (a bf16 pass over "
        "fewer tokens than that per weight read is memory-bound), fp64/fp32 "
        f"{PEAK['fp64'] / HBM:.0f}",
        f"- model: hidden {m.d}, intermediate {m.d_in}, {m.n_layers} layers, {m.heads} heads, "
        f"{m.kv_dim // m.head_dim} KV heads, vocab {m.vocab}, bf16, on the meta device; "
        f"counted with torch {torch.__version__}, transformers {transformers.__version__} "
        "(no GPU used)", "",
        "## Per stage", "", "| " + " | ".join(head_rows) + " |",
        "|" + "---|" * len(head_rows)]
    lines += ["| " + " | ".join(c) + " |" for c in table(rows)]
    amort = rows[-1].seconds / 10000
    lines += ["", "## Totals (values + keys + solve + apply; statistics once per model)", "",
              f"- reference: **{ref:.4f} s/edit** ({ref * a.batch:.2f} s per batch)",
              f"- fast: **{fast:.4f} s/edit** ({fast * a.batch:.2f} s per batch)",
              f"- ratio reference / fast: **{ref / fast:.1f}×**",
              f"- statistics, once per model: {rows[-1].seconds:.2f} s "
              f"({amort * 1e3:.3f} ms/edit over 10,000 sequential edits)"]
    if a.steps != a.max_steps:
        alt = batch_rows(m, replace(a, steps=float(a.max_steps)))
        r2, f2 = per_edit(alt, "reference", a.batch), per_edit(alt, "fast", a.batch)
        lines += [f"- at {a.max_steps} steps (no MPES): reference {r2:.4f} s/edit, fast "
                  f"{f2:.4f} s/edit, ratio {r2 / f2:.1f}×"]
    return "\n".join(lines) + "\n", rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: every field of :class:`Assumptions`, and the outputs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Assumptions()
    for f in fields(defaults):
        v, flag, text = getattr(defaults, f.name), f"--{f.name.replace('_', '-')}", f.metadata
        if isinstance(v, list):
            p.add_argument(flag, type=int, nargs="+", default=v, help=text["help"])
        else:
            p.add_argument(flag, type=type(v), default=v, help=text["help"])
    p.add_argument("--out", type=Path, help="write the Markdown report here")
    p.add_argument("--csv", action="store_true", help="also write a CSV beside --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the report; write it (and the CSV) if asked."""
    args = parse(argv)
    if args.csv and args.out is None:
        raise SystemExit("--csv needs --out")
    a = Assumptions(**{f.name: getattr(args, f.name) for f in fields(Assumptions)})
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/cost_model.py", *words])
    text, rows = report(MetaModel(llama3_8b_config()), a, command)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        if args.csv:
            with args.out.with_suffix(".csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["stage", "engine", "gflop", "gb", "floor_ms", "bound"])
                w.writerows([r.stage, r.engine, f"{r.work.flops / 1e9:.4g}",
                             f"{r.work.bytes / 1e9:.4g}", f"{r.seconds * 1e3:.4g}", r.bound]
                            for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
