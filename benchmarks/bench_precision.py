"""bf16 (fp32 master weights) vs fp32 editing, side by side in one process, same requests.

    python benchmarks/bench_precision.py --n 200 --batch-size 50 \\
        --out benchmarks/results/precision_cpu.csv

SmolLM2-135M, ENCORE, the first ``--n`` requests of ``counterfact-edit.json``. For each dtype:
the statistics pass (``C0`` over ``--stats-samples`` WikiText texts, timed), then the edits in
batches (timed end to end), then top-1 scores, teacher-forced: efficacy (every target token is
the argmax after the rewrite prompt), paraphrase (the same on each paraphrase prompt) and
neighbourhood (the first predicted token after a neighbourhood prompt unchanged from the
unedited model's). Prints both rows and the speed ratios, names the CPU and its bf16 support,
and appends the rows to a CSV.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from csv_rows import append_rows

from encore_fast.editor import Editor
from encore_fast.eval.datasets import EvalRecord, load_dataset
from encore_fast.eval.metrics import pad_id, score_token_ids
from encore_fast.models import ModelView, load_model
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.paths import default_corpus, default_data_dir
from encore_fast.requests import encode, target_token_ids
from encore_fast.stats import second_moments

LAYERS = [4, 5, 6, 7, 8]


def cpu_name() -> str:
    """The CPU model and which native bf16 instructions it has (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")), platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({'native bf16: ' + ', '.join(native) if native else 'no native bf16'})"


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


def run_dtype(model: Any, tok: Any, dtype: torch.dtype, records: list[EvalRecord],
              batch_size: int, stats_samples: int, before: list[int]) -> dict:
    """Statistics, edits and scores of one dtype (its own copy of the model)."""
    m = copy.deepcopy(model).to(dtype)
    t0 = time.perf_counter()
    stats = second_moments(ModelView(m), tok, LAYERS, default_corpus(), n_samples=stats_samples,
                           max_length=256, fingerprint=model_fingerprint(m), cache=False,
                           progress=False)
    t_stats = time.perf_counter() - t0
    ed = Editor(m, tok, "encore", "smollm2-135m", stats=stats, progress=False)
    ed.context_templates  # noqa: B018 - generated once, outside the timed region
    t0 = time.perf_counter()
    reports = ed.edit([r.request for r in records], batch_size=batch_size)
    t_edit = time.perf_counter() - t0
    n = len(records)
    row = dict(dtype=str(dtype).removeprefix("torch."), masters=ed.master_weights,
               stats_s=t_stats, edit_s_per_edit=t_edit / n,
               values_s_per_edit=sum(r.seconds_values for r in reports) / n,
               mean_steps=sum(sum(r.steps) for r in reports) / n)
    row.update(scores(m, tok, records, before))
    ed.release()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="edit requests (one stream)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--stats-samples", type=int, default=1000, help="texts for C0")
    p.add_argument("--out", default=None, help="CSV file to append the rows to")
    args = p.parse_args(argv)
    data = default_data_dir()
    if data is None:
        print("error: no data folder (set ENCORE_FAST_DATA)", file=sys.stderr)
        return 2
    records = load_dataset(data / "counterfact" / "counterfact-edit.json", limit=args.n)
    model, tok = load_model(None)
    before = first_tokens(model, tok, [p for r in records for p in r.neighborhood_prompts])
    rows = [run_dtype(model, tok, dt_, records, args.batch_size, args.stats_samples, before)
            for dt_ in (torch.float32, torch.bfloat16)]
    cpu = cpu_name()
    for row in rows:
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)
    fp32, bf16 = rows
    print(f"bf16 vs fp32: end to end {fp32['edit_s_per_edit'] / bf16['edit_s_per_edit']:.2f}x, "
          f"statistics {fp32['stats_s'] / bf16['stats_s']:.2f}x faster; "
          f"{torch.get_num_threads()} threads on {cpu}; torch {torch.__version__}")
    if args.out:
        append_rows(args.out, ["date", "cpu", "threads", "edits", "batch", *rows[0]],
                    [[dt.date.today().isoformat(), cpu, torch.get_num_threads(), args.n,
                      args.batch_size, *row.values()] for row in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
