"""Editing methods side by side: seconds per edit and the value optimisation's FLOP rate, one
process, same requests.

    python benchmarks/bench_methods.py --dtype bf16 --n 200 --batch-size 100 \\
        --set encore:lambda_p=5000 --set encore:lambda_n=20 --set memit-seq:lambda_p=5000 \\
        --out benchmarks/results/methods_cpu.csv
    python benchmarks/bench_methods.py --methods all --n 20 --batch-size 10
    python benchmarks/bench_methods.py --methods all --tuned \\
        --out benchmarks/results/methods_cpu.csv
    python benchmarks/bench_methods.py --methods encore,alphaedit+nas \\
        --set alphaedit+nas:nas.anchor=3.2

``--methods``: any registered method -- a rule, an alias, a composition ``rule+transform`` --
comma-separated; ``all`` is every rule, the published compositions whose parts are registered
(``alphaedit+nas``, ``alphaedit+sphere``, ``memit-seq+rect``, ``memit-seq+prune``) and the
aliases (one run per distinct method). A method that is not registered, or that raises, gets a
row marked ``failed`` with the error, and the others still run.

SmolLM2-135M (bundled), the fast engine, the first ``--n`` requests of ``counterfact-edit.json``
in sequential batches; each method edits its own copy of the model from the same ``C0`` (the
statistics cache, made once; not timed) and the same context templates (made before the clock
starts). Prints per method the seconds per edit end to end, the value optimisation and the
update, the mean number of value updates per request, the FLOPs of one value step (counted from
the shapes: ``value_flops.py`` states how), the FLOP rate the value optimisation achieved, that
rate as a fraction of a square matmul's measured in the same run (same dtype, device, threads),
and each method's time over the first method's (the first that ran) -- the paper's speed claim
(ENCORE 61 % / 64 % faster than MEMIT / AlphaEdit on Llama3-8B) is about exactly this ratio.
A method without per-fact value optimisation (UltraEdit) has no FLOP columns. Appends the rows
to a CSV (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import torch
from bench_engines import edit_requests
from compare_methods import per_method_overrides
from csv_rows import append_rows
from tuned import NotTuned, tuned
from value_flops import Shape, matmul_ceiling, request_work, value_flops

from encore_fast.batch_report import BatchReport
from encore_fast.config import parse_overrides
from encore_fast.editor import Editor
from encore_fast.errors import ConfigError
from encore_fast.machine import cpu_model
from encore_fast.methods import ALIASES, RULES, TRANSFORMS, canonical
from encore_fast.models import ModelView, load_model
from encore_fast.models.dtypes import DTYPES
from encore_fast.requests import EditRequest
from encore_fast.values.prompts import PromptTokens, build_value_prompts

PUBLISHED = ("alphaedit+nas", "alphaedit+sphere", "memit-seq+rect", "memit-seq+prune")
# The CSV's columns after the run's (date ... batch): the first ones as before, then the new.
COLUMNS = ("method", "s_per_edit", "values", "update", "steps", "settings", "time_vs_first",
           "status", "error", "tokens_per_step", "flops_per_step", "value_flops",
           "value_flops_per_s", "matmul_size", "matmul_flops_per_s", "fraction_of_matmul")


def method_key(name: str) -> str:
    """``name``'s canonical form (an alias expanded), or ``name`` itself if it is not valid."""
    try:
        return canonical(name)
    except ConfigError:
        return name


def all_methods() -> list[str]:
    """Every registered rule, the published compositions whose parts are all registered, and
    every alias whose method is valid."""
    parts = {*RULES, *TRANSFORMS}
    found = [*RULES, *(c for c in PUBLISHED if set(c.split("+")) <= parts)]
    return found + [a for a in ALIASES if method_key(a) != a]


def expand_methods(spec: str) -> list[str]:
    """The methods of a ``--methods`` value, ``all`` expanded, each distinct method (by its
    canonical name) once, in the order first written."""
    out: list[str] = []
    seen: set[str] = set()
    for item in (m.strip() for m in spec.split(",")):
        for name in all_methods() if item == "all" else [item] if item else []:
            if method_key(name) not in seen:
                seen.add(method_key(name))
                out.append(name)
    return out


def value_columns(ed: Editor, requests: Sequence[EditRequest],
                  reports: Sequence[BatchReport], ceiling: float) -> dict[str, Any]:
    """The value optimisation's counted FLOPs and rates (empty without value steps)."""
    steps = [s for r in reports for s in r.steps]
    seconds = sum(r.seconds_values for r in reports)
    if len(steps) != len(requests) or not sum(steps) or seconds <= 0:
        return {}  # no per-fact value optimisation (UltraEdit)
    tokens = PromptTokens(ed.tokenizer)
    works = [request_work(build_value_prompts(ed.tokenizer, r, ed.context_templates, tokens))
             for r in requests]
    blocks = ed.view.num_layers - ed.hparams.layers[-1] - 1  # the blocks after l_m
    per_step, total = value_flops(Shape.of(ed.model.config), blocks, works, steps)
    rate = total / seconds
    return dict(tokens_per_step=sum(w.tokens for w in works) / len(works),
                flops_per_step=per_step, value_flops=total, value_flops_per_s=rate,
                fraction_of_matmul=rate / ceiling)


def time_method(model: Any, tok: Any, method: str, requests: list[EditRequest],
                batch_size: int, overrides: dict[str, Any], ceiling: float) -> dict[str, Any]:
    """Edit ``requests`` with ``method`` on a copy of ``model``; the timings of the edits alone,
    and the value optimisation's FLOPs against the matmul ``ceiling`` (FLOP/s)."""
    ed = Editor(copy.deepcopy(model), tok, method, "smollm2-135m", progress=False, history=0,
                **overrides)
    try:
        ed.layer_states()  # C0 (from the cache) and the context templates: outside the clock
        ed.context_templates  # noqa: B018
        t0 = time.perf_counter()
        reports = ed.edit(requests, batch_size=batch_size)
        total = time.perf_counter() - t0
        n = len(requests)
        row = dict(method=method, s_per_edit=total / n,
                   values=sum(r.seconds_values for r in reports) / n,
                   update=sum(r.seconds_update for r in reports) / n,
                   steps=sum(sum(r.steps) for r in reports) / n, status="ok")
        return {**row, **value_columns(ed, requests, reports, ceiling)}
    finally:
        ed.release()


def run_methods(model: Any, tok: Any, methods: Sequence[str], requests: list[EditRequest],
                batch_size: int, overrides: dict[str, dict[str, Any]],
                ceiling: float) -> list[dict[str, Any]]:
    """One row per method, in order; a method that raises gets a ``failed`` row (its error
    text) and the next one runs."""
    rows = []
    for method in methods:
        own = overrides.get(method_key(method), {})
        try:
            canonical(method)  # (a method not registered fails here, before the copy)
            row = time_method(model, tok, method, requests, batch_size, own, ceiling)
        except Exception as exc:  # noqa: BLE001 - reported in the row; the run goes on
            row = dict(method=method, status="failed",
                       error=f"{type(exc).__name__}: {exc}".replace("\n", " "))
        row.update(settings=" ".join(f"{k}={v}" for k, v in sorted(own.items())),
                   matmul_flops_per_s=ceiling)
        rows.append(row)
        print(progress_line(row), flush=True)
    return rows


def compare_with_first(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Set each row's ``time_vs_first`` against the first method that ran; return that row."""
    first = next((r for r in rows if r["status"] == "ok"), None)
    for row in rows:
        if first is not None and row["status"] == "ok":
            row["time_vs_first"] = row["s_per_edit"] / first["s_per_edit"]
    return first


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``NA`` when it is missing."""
    return "NA" if value is None else format(value, spec)


def progress_line(row: dict[str, Any]) -> str:
    """The line printed when a method is done."""
    if row["status"] != "ok":
        return f"{row['method']:>16}: failed -- {row['error']}"
    return (f"{row['method']:>16}: {row['s_per_edit']:.3f} s/edit (values {row['values']:.3f}, "
            f"update {row['update']:.3f}; mean value updates {row['steps']:.1f}; "
            f"values at {fmt(row.get('value_flops_per_s'), '.3g')} FLOP/s)")


TABLE = (("method", "method", ">16"), ("s/edit", "s_per_edit", ".4f"),
         ("values", "values", ".4f"), ("update", "update", ".4f"), ("steps", "steps", ".1f"),
         ("FLOP/step", "flops_per_step", ".3g"), ("value FLOP/s", "value_flops_per_s", ".3g"),
         ("matmul FLOP/s", "matmul_flops_per_s", ".3g"),
         ("of matmul", "fraction_of_matmul", ".1%"), ("vs first", "time_vs_first", ".2f"))


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The rows as a table (NA where a method has no such value; a failed method's error was
    printed when it failed)."""
    widths = [max(len(head), 16 if key == "method" else 12) for head, key, _ in TABLE]
    print("  ".join(head.rjust(w) for (head, _, _), w in zip(TABLE, widths, strict=True)))
    for row in rows:
        cells = ([fmt(row.get(key), spec) for _, key, spec in TABLE] if row["status"] == "ok"
                 else [row["method"], "failed", *[""] * (len(TABLE) - 2)])
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))


def print_ratios(rows: Sequence[dict[str, Any]], first: dict[str, Any] | None) -> None:
    """How the first method's time compares with each other's."""
    if first is None:
        return
    for row in rows:
        if row is first or row["status"] != "ok":
            continue
        saved = 1 - first["s_per_edit"] / row["s_per_edit"]
        print(f"{first['method']} takes {first['s_per_edit'] / row['s_per_edit']:.2f}x the time "
              f"of {row['method']} ({saved:.0%} less)")


def tuned_overrides(method: str) -> dict[str, Any]:
    """``method``'s tuned settings (:mod:`tuned`) as overrides; none when it is not tuned."""
    try:
        return parse_overrides(tuned(method)[0].split())
    except NotTuned as exc:
        print(f"{exc}: its preset", flush=True)
        return {}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str],
                                                dict[str, dict[str, Any]]]:
    """The options, the methods to run, and each method's settings (by canonical name)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="encore,memit-seq,alphaedit",
                   help="comma-separated methods (rules, aliases, compositions 'rule+transform') "
                        "or 'all'; the first that runs is the one the others are compared with")
    p.add_argument("--n", type=int, default=100, help="edit requests (one stream)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a setting of one method (repeatable; KEY may be a part's own setting: "
                        "alphaedit+nas:nas.anchor=3.2)")
    p.add_argument("--tuned", action="store_true",
                   help="each method with its tuned SmolLM2-135M settings (benchmarks/tuned.py; "
                        "a method not tuned yet runs with its preset, said in its row); --set "
                        "overrides them")
    p.add_argument("--matmul-size", type=int, default=1024,
                   help="side of the square matmul whose FLOP/s is the ceiling (default 1024)")
    p.add_argument("--out", default=None, help="CSV file to append the rows to")
    args = p.parse_args(argv)
    methods = expand_methods(args.methods)
    if not methods:
        p.error(f"--methods {args.methods!r} names no method")
    if args.n < 1 or args.batch_size < 1 or args.matmul_size < 1:
        p.error("--n, --batch-size and --matmul-size must be >= 1")
    try:
        raw = per_method_overrides(args.set)
    except ValueError as exc:
        p.error(str(exc))
    overrides = {method_key(m): v for m, v in raw.items()}
    if args.tuned:
        overrides = {method_key(m): {**tuned_overrides(m), **overrides.get(method_key(m), {})}
                     for m in methods}
    stray = sorted(m for m in raw if method_key(m) not in {method_key(x) for x in methods})
    if stray:
        p.error(f"--set names methods that are not run: {', '.join(stray)}")
    return args, methods, overrides


def main(argv: list[str] | None = None) -> int:
    args, methods, overrides = parse_args(argv)
    requests = edit_requests(args.n)
    if requests is None:
        return 2
    model, tok = load_model(None, dtype=DTYPES[args.dtype])
    ceiling = matmul_ceiling(args.matmul_size, DTYPES[args.dtype], ModelView(model).device)
    print(f"matmul ceiling: {ceiling:.3g} FLOP/s ({args.matmul_size}² {args.dtype}, "
          f"{torch.get_num_threads()} threads)", flush=True)
    rows = run_methods(model, tok, methods, requests, args.batch_size, overrides, ceiling)
    for row in rows:
        row["matmul_size"] = args.matmul_size
    first = compare_with_first(rows)
    print_table(rows)
    print_ratios(rows, first)
    cpu = cpu_model()
    print(f"{torch.get_num_threads()} threads on {cpu}; SmolLM2-135M {args.dtype}; "
          f"{args.n} edits, batch {args.batch_size}; torch {torch.__version__}")
    if args.out:
        append_rows(args.out, ["date", "cpu", "threads", "dtype", "edits", "batch", *COLUMNS],
                    [[dt.date.today().isoformat(), cpu, torch.get_num_threads(), args.dtype,
                      args.n, args.batch_size, *(row.get(c) for c in COLUMNS)] for row in rows])
    return 0 if first is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
