"""ENCORE vs MEMIT-seq vs AlphaEdit: seconds per edit side by side, one process, same requests.

    python benchmarks/bench_methods.py --dtype bf16 --n 200 --batch-size 100 \\
        --set encore:lambda_p=5000 --set encore:lambda_n=20 --set memit-seq:lambda_p=5000 \\
        --out benchmarks/results/methods_cpu.csv

SmolLM2-135M (bundled), the fast engine, the first ``--n`` requests of ``counterfact-edit.json``
in sequential batches; each method edits its own copy of the model from the same ``C0`` (the
statistics cache, made once; not timed) and the same context templates (made before the clock
starts). Prints per method the seconds per edit end to end, the value optimisation and the
update, the mean number of value updates per request, and each method's time over the first
method's -- the paper's speed claim (ENCORE 61 % / 64 % faster than MEMIT / AlphaEdit on
Llama3-8B) is about exactly this ratio: MPES stops the value optimisation early, the update is
the same kind of solve for all three. Appends the rows to a CSV (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import time
from typing import Any

import torch
from bench_engines import edit_requests
from compare_methods import per_method_overrides
from csv_rows import append_rows

from encore_fast.editor import Editor
from encore_fast.machine import cpu_model
from encore_fast.methods import RULES
from encore_fast.models import load_model
from encore_fast.models.dtypes import DTYPES
from encore_fast.requests import EditRequest


def time_method(model: Any, tok: Any, method: str, requests: list[EditRequest],
                batch_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Edit ``requests`` with ``method`` on a copy of ``model``; the timings of the edits alone."""
    ed = Editor(copy.deepcopy(model), tok, method, "smollm2-135m", progress=False, history=0,
                **overrides)
    ed.layer_states()  # C0 (from the cache) and the context templates: outside the clock
    ed.context_templates  # noqa: B018
    t0 = time.perf_counter()
    reports = ed.edit(requests, batch_size=batch_size)
    total = time.perf_counter() - t0
    n = len(requests)
    ed.release()
    return dict(method=method, s_per_edit=total / n,
                values=sum(r.seconds_values for r in reports) / n,
                update=sum(r.seconds_update for r in reports) / n,
                steps=sum(sum(r.steps) for r in reports) / n,
                settings=" ".join(f"{k}={v}" for k, v in sorted(overrides.items())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="encore,memit-seq,alphaedit",
                   help="comma-separated; the first is the one the others are compared with")
    p.add_argument("--n", type=int, default=100, help="edit requests (one stream)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a setting of one method (repeatable)")
    p.add_argument("--out", default=None, help="CSV file to append the rows to")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RULES]
    if unknown or not methods:
        p.error(f"--methods {args.methods!r}: choose from {', '.join(sorted(RULES))}")
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch-size must be >= 1")
    try:
        overrides = per_method_overrides(args.set)
    except ValueError as exc:
        p.error(str(exc))
    stray = sorted(set(overrides) - set(methods))
    if stray:
        p.error(f"--set names methods that are not run: {', '.join(stray)}")
    requests = edit_requests(args.n)
    if requests is None:
        return 2
    model, tok = load_model(None, dtype=DTYPES[args.dtype])
    rows = []
    for method in methods:
        row = time_method(model, tok, method, requests, args.batch_size,
                          overrides.get(method, {}))
        rows.append(row)
        print(f"{method:>10}: {row['s_per_edit']:.3f} s/edit (values {row['values']:.3f}, "
              f"update {row['update']:.3f}; mean value updates {row['steps']:.1f})", flush=True)
    first = rows[0]
    for row in rows:
        row["time_vs_first"] = row["s_per_edit"] / first["s_per_edit"]
    for row in rows[1:]:
        saved = 1 - first["s_per_edit"] / row["s_per_edit"]
        print(f"{first['method']} takes {first['s_per_edit'] / row['s_per_edit']:.2f}x the time "
              f"of {row['method']} ({saved:.0%} less)")
    cpu = cpu_model()
    print(f"{torch.get_num_threads()} threads on {cpu}; SmolLM2-135M {args.dtype}; "
          f"{args.n} edits, batch {args.batch_size}; torch {torch.__version__}")
    if args.out:
        append_rows(args.out, ["date", "cpu", "threads", "dtype", "edits", "batch", *rows[0]],
                    [[dt.date.today().isoformat(), cpu, torch.get_num_threads(), args.dtype,
                      args.n, args.batch_size, *row.values()] for row in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
