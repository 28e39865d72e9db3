"""bf16 (fp32 master weights) vs fp32 editing, side by side in one process, same requests.

    python benchmarks/bench_precision.py --n 200 --batch-size 50 \\
        --out benchmarks/results/precision_cpu.csv

SmolLM2-135M, ENCORE, the first ``--n`` requests of ``counterfact-edit.json``. For each dtype:
the statistics pass (``C0`` over ``--stats-samples`` WikiText texts, timed), then the edits in
batches (timed end to end), then top-1 scores, teacher-forced: efficacy (every target token is
the argmax after the rewrite prompt), paraphrase (the same on each paraphrase prompt) and
neighbourhood (the first predicted token after a neighbourhood prompt unchanged from the
unedited model's in the same dtype), and ES/PS/NS (probability comparisons,
``counterfact_metrics``). Prints the rows and the speed ratios, names the CPU and its bf16
support, and appends the rows to a CSV.

The case for master weights, one stream, three editors (``--variants``):

    python benchmarks/bench_precision.py --n 1000 --batch-size 50 \\
        --variants fp32,bf16,bf16-no-masters --no-top1 \\
        --out benchmarks/results/precision_1000_cpu.csv

Each 16-bit row also gives how far its final edited weights are from the fp32 run's:
``weight_dist`` = ‖W − W_fp32‖_F over all edited layers (``floor_dist``: that of the fp32 run's
weights rounded, the closest a bf16 model can be), and ``rel_update_dist``, the distance of the
run's accumulated update from the fp32 run's over the size of the latter. The model's weights are
compared (what the edited model computes with), not the masters. Both bf16 editors share one
bf16 ``C0`` (its statistics time is that pass's).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time
from typing import Any

import torch
from csv_rows import append_rows

from encore_fast.editor import Editor
from encore_fast.eval.datasets import EvalRecord, load_dataset
from encore_fast.eval.metrics import counterfact_metrics, pad_id, score_token_ids
from encore_fast.machine import cpu_model
from encore_fast.models import ModelView, load_model
from encore_fast.models.dtypes import DTYPES
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.paths import default_corpus, default_data_dir
from encore_fast.requests import encode, target_token_ids
from encore_fast.stats import second_moments

LAYERS = [4, 5, 6, 7, 8]
VARIANTS = {"fp32": (DTYPES["fp32"], None), "bf16": (DTYPES["bf16"], True),
            "bf16-no-masters": (DTYPES["bf16"], False), "fp16": (DTYPES["fp16"], True)}


def top1_hits(model: Any, tok: Any, prompts: list[str], targets: list[str]) -> list[bool]:
    """Teacher-forced: every target token is the argmax after its prompt."""
    pairs = [(encode(tok, p), target_token_ids(tok, t)) for p, t in zip(prompts, targets,
                                                                       strict=True)]
    return [all(s.correct) for s in score_token_ids(model, pairs, pad_id(tok), 32)]


def first_tokens(model: Any, tok: Any, prompts: list[str]) -> list[int]:
    """The argmax next token after each prompt."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([encode(tok, p)])
            out.append(int(model(ids).logits[0, -1].argmax()))
    return out


def scores(model: Any, tok: Any, records: list[EvalRecord], before: list[int]) -> dict:
    """Top-1 efficacy, paraphrase, neighbourhood-unchanged (means over prompts)."""
    reqs = [r.request for r in records]
    es = top1_hits(model, tok, [r.text for r in reqs], [r.target_new for r in reqs])
    para = [(p, r.request.target_new) for r in records for p in r.paraphrase_prompts]
    ps = top1_hits(model, tok, [p for p, _ in para], [t for _, t in para])
    neigh = [p for r in records for p in r.neighborhood_prompts]
    after = first_tokens(model, tok, neigh)
    ns = [a == b for a, b in zip(after, before, strict=True)]
    return dict(efficacy=sum(es) / len(es), paraphrase=sum(ps) / max(1, len(ps)),
                neighbourhood=sum(ns) / max(1, len(ns)))


def dtype_stats(model: Any, tok: Any, dtype: torch.dtype, stats_samples: int) -> tuple[dict, float]:
    """``C0`` of every edited layer computed in ``dtype`` (a copy of the model), and its time."""
    m = copy.deepcopy(model).to(dtype)
    t0 = time.perf_counter()
    stats = second_moments(ModelView(m), tok, LAYERS, default_corpus(), n_samples=stats_samples,
                           max_length=256, fingerprint=model_fingerprint(m), cache=False,
                           progress=False)
    return stats, time.perf_counter() - t0


def run_variant(model: Any, tok: Any, variant: str, records: list[EvalRecord], batch_size: int,
                stats: dict, t_stats: float, top1: bool = True) -> tuple[dict, dict]:
    """Edits and scores of one variant (its own copy of the model); the row and final weights.
    Neighbourhood: against the predictions of the unedited model in the variant's dtype."""
    dtype, masters = VARIANTS[variant]
    m = copy.deepcopy(model).to(dtype)
    before = first_tokens(m, tok, [p for r in records for p in r.neighborhood_prompts]
                          ) if top1 else []
    ed = Editor(m, tok, "encore", "smollm2-135m", stats=stats, progress=False,
                master_weights=masters)
    ed.context_templates  # noqa: B018 - generated once, outside the timed region
    t0 = time.perf_counter()
    reports = ed.edit([r.request for r in records], batch_size=batch_size)
    t_edit = time.perf_counter() - t0
    n = len(records)
    row = dict(variant=variant, dtype=str(dtype).removeprefix("torch."),
               masters=ed.master_weights, stats_s=t_stats, edit_s_per_edit=t_edit / n,
               values_s_per_edit=sum(r.seconds_values for r in reports) / n,
               mean_steps=sum(sum(r.steps) for r in reports) / n)
    if top1:
        row.update(scores(m, tok, records, before))
    cf = counterfact_metrics(m, tok, records)
    row.update(es=cf["es"], ps=cf["ps"], ns=cf["ns"])
    weights = {l: ed.view.weight(l).detach().float().clone() for l in LAYERS}
    ed.release()
    return row, weights


def weight_distances(weights: dict, fp32: dict, original: dict, dtype: torch.dtype) -> dict:
    """How far a run's final weights are from the fp32 run's, over all edited layers.

    ``weight_dist`` ‖W − W_fp32‖_F; ``floor_dist`` ‖round(W_fp32) − W_fp32‖_F, the closest a
    model of ``dtype`` can be; ``rel_update_dist`` ‖ΔW − ΔW_fp32‖_F / ‖ΔW_fp32‖_F with ΔW the
    run's accumulated update (its weights minus its rounded original), which leaves out the
    one-off rounding of the original weights."""
    def norm(diffs):  # Frobenius norm over all layers
        return sum(float(d.pow(2).sum()) for d in diffs) ** 0.5
    base = {l: original[l].to(dtype).float() for l in LAYERS}
    update = norm(fp32[l] - original[l] for l in LAYERS)
    gap = norm((weights[l] - base[l]) - (fp32[l] - original[l]) for l in LAYERS)
    return dict(weight_dist=norm(weights[l] - fp32[l] for l in LAYERS),
                floor_dist=norm(fp32[l].to(dtype).float() - fp32[l] for l in LAYERS),
                rel_update_dist=gap / update if update else float("nan"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="edit requests (one stream)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--stats-samples", type=int, default=1000, help="texts for C0")
    p.add_argument("--variants", default="fp32,bf16",
                   help=f"comma-separated, fp32 first; of {', '.join(VARIANTS)}")
    p.add_argument("--no-top1", action="store_true",
                   help="skip the top-1 scores (ES/PS/NS only: much faster for long streams)")
    p.add_argument("--out", default=None, help="CSV file to append the rows to")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or variants[0] != "fp32":
        p.error(f"--variants {args.variants!r}: fp32 first, then any of {', '.join(VARIANTS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    data = default_data_dir()
    if data is None:
        print("error: no data folder (set ENCORE_FAST_DATA)", file=sys.stderr)
        return 2
    records = load_dataset(data / "counterfact" / "counterfact-edit.json", limit=args.n)
    model, tok = load_model(None)
    view = ModelView(model)
    original = {l: view.weight(l).detach().float().clone() for l in LAYERS}
    stats_by_dtype: dict[torch.dtype, tuple[dict, float]] = {}
    rows, fp32_weights = [], None
    for variant in variants:
        dtype = VARIANTS[variant][0]
        if dtype not in stats_by_dtype:
            stats_by_dtype[dtype] = dtype_stats(model, tok, dtype, args.stats_samples)
        row, weights = run_variant(model, tok, variant, records, args.batch_size,
                                   *stats_by_dtype[dtype], top1=not args.no_top1)
        if fp32_weights is None:
            fp32_weights = weights
        row.update(weight_distances(weights, fp32_weights, original, dtype))
        rows.append(row)
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)
    cpu = cpu_model()
    fp32 = rows[0]
    for row in rows[1:]:
        print(f"{row['variant']} vs fp32: end to end "
              f"{fp32['edit_s_per_edit'] / row['edit_s_per_edit']:.2f}x, "
              f"statistics {fp32['stats_s'] / row['stats_s']:.2f}x faster")
    print(f"{torch.get_num_threads()} threads on {cpu}; torch {torch.__version__}")
    if args.out:
        append_rows(args.out, ["date", "cpu", "threads", "edits", "batch", *rows[0]],
                    [[dt.date.today().isoformat(), cpu, torch.get_num_threads(), args.n,
                      args.batch_size, *row.values()] for row in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
