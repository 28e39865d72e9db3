"""Speed blocks: the engines (``engines_cpu.csv``, ``refactor-23/``), the methods side by side
(``methods_cpu.csv``), the H100 cost model, and the statistics pass on two processes."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from .registry import csv_rows, generator, jsonl, less_time, num, read_json, results, span

NAMES = {"encore": "ENCORE", "memit": "MEMIT", "memit-seq": "MEMIT-seq",
         "alphaedit": "AlphaEdit"}


def _engines(root: Path) -> tuple[list[dict[str, str]], dict[str, float]]:
    """``engines_cpu.csv``'s rows, and its last row (the fast engine as it is now) as numbers."""
    rows = csv_rows(results(root, "engines_cpu.csv"))
    last = {k: float(v) for k, v in rows[-1].items() if k.endswith(("s_per_edit", "_values",
                                                                     "_update"))}
    return rows, last


def _column(rows: list[dict[str, str]], key: str, digits: int) -> str:
    """One column of CSV rows as numbers, comma-separated."""
    return ", ".join(num(float(r[key]), digits) for r in rows)


@generator("engines-cpu")
def engines_cpu(root: Path) -> str:
    """Reference vs fast engine: the latest run's split (the file's last row), and every run's
    times, since only the reference engine was measured more than once as it is."""
    rows, last = _engines(root)
    ref, fast = float(rows[-1]["ref_s_per_edit"]), float(rows[-1]["fast_s_per_edit"])
    refs = [float(r["ref_s_per_edit"]) for r in rows]
    lines = [
        "| engine | s/edit | value optimisation | update (keys, residuals, solve, apply) |",
        "|---|---|---|---|",
        f"| reference | {ref:.2f} | {last['ref_values']:.2f} | {last['ref_update']:.3f} |",
        f"| fast | {fast:.2f} | {last['fast_values']:.2f} | {last['fast_update']:.3f} |",
        f"| ratio | **{ref / fast:.1f}×** | {last['ref_values'] / last['fast_values']:.1f}× | "
        f"{last['ref_update'] / last['fast_update']:.1f}× |",
        "",
        f"That is the file's last row ({rows[-1]['date']}), one run of the fast engine as it "
        f"was then. Over the file's {len(rows)} runs the reference engine took {span(refs, 2)} "
        f"s/edit; the fast engine, row by row as it improved: "
        f"{_column(rows, 'fast_s_per_edit', 2)} s/edit (its update "
        f"{_column(rows, 'fast_update', 3)}).",
    ]
    return "\n".join(lines)


@generator("engines-history")
def engines_history(root: Path) -> str:
    """The first rows of ``engines_cpu.csv`` against its last: what the changes below gained."""
    rows, _ = _engines(root)
    before = [float(r["fast_s_per_edit"]) for r in rows[:-1]]
    return (f"What moved the fast engine from {span(before, 2)} s/edit (the file's first "
            f"{len(before)} rows) to {float(rows[-1]['fast_s_per_edit']):.2f} (its last), "
            f"in order; the timings between those steps were not kept in a file:")


@generator("methods-cpu")
def methods_cpu(root: Path) -> str:
    """ENCORE, MEMIT-seq and AlphaEdit side by side on one batch (``methods_cpu.csv``), and how
    many value updates MPES leaves ENCORE later in the study's stream (``study-smollm2-10k``)."""
    rows = csv_rows(results(root, "methods_cpu.csv"))
    by = {r["method"]: r for r in rows}
    lines = ["| method | s/edit | value optimisation | update | mean value updates |",
             "|---|---|---|---|---|"]
    lines += [f"| {NAMES.get(r['method'], r['method'])} | {float(r['s_per_edit']):.3f} | "
              f"{float(r['values']):.3f} | {float(r['update']):.3f} | {float(r['steps']):.1f} |"
              for r in rows]
    enc = float(by["encore"]["s_per_edit"])
    study = results(root, "study-smollm2-10k")
    later = [statistics.mean(b["steps"]) for b in jsonl(study / "encore" / "results.jsonl")
             if b.get("type") == "batch" and b["edits_done"] > 1000]
    speed = read_json(study / "summary.json")["encore"]["sec_per_edit"]
    lines += ["", f"**ENCORE takes {less_time(enc, float(by['memit-seq']['s_per_edit']))} less "
                  f"time than MEMIT-seq and {less_time(enc, float(by['alphaedit']['s_per_edit']))}"
                  f" less than AlphaEdit** on this first batch (one run). MPES stops ENCORE after "
                  f"{float(by['encore']['steps']):.1f} updates per request on average here and "
                  f"after {span(later, 1)} per batch (mean {statistics.mean(later):.1f}) from "
                  f"1,000 edits on in the study's run, so over a long run its advantage grows (its "
                  f"median batch in the study: {speed:.3f} s/edit)."]
    return "\n".join(lines)


@generator("readme-speed")
def readme_speed(root: Path) -> str:
    """The README's two speed sentences: engines (``engines_cpu.csv``) and methods
    (``methods_cpu.csv``)."""
    rows, _ = _engines(root)
    last = rows[-1]
    ref, fast = float(last["ref_s_per_edit"]), float(last["fast_s_per_edit"])
    refs = [float(r["ref_s_per_edit"]) for r in rows]
    by = {r["method"]: r for r in csv_rows(results(root, "methods_cpu.csv"))}
    enc = by["encore"]
    sec = {m: float(r["s_per_edit"]) for m, r in by.items()}
    return (f"On {last['device']}, {last['model']}, ENCORE, one batch of {last['batch']} "
            f"(`engines_cpu.csv`): reference {ref:.2f} s/edit, fast {fast:.2f} s/edit "
            f"({ref / fast:.1f}×; one run of the fast engine as it was on {last['date']}, the "
            f"reference {span(refs, 2)} over the file's {len(rows)} runs). The methods side by "
            f"side on the first {enc['edits']} requests in one batch, {enc['dtype']} SmolLM2 on "
            f"{enc['threads']} threads of an {enc['cpu'].split(' (')[0]} (`methods_cpu.csv`, "
            f"one run): ENCORE "
            f"{sec['encore']:.2f} s/edit, MEMIT-seq {sec['memit-seq']:.2f}, AlphaEdit "
            f"{sec['alphaedit']:.2f}: {less_time(sec['encore'], sec['memit-seq'])} / "
            f"{less_time(sec['encore'], sec['alphaedit'])} less time for ENCORE.")


@generator("cost-model-h100")
def cost_model_h100(root: Path) -> str:
    """The H100 floors: totals from ``cost_model_h100.md`` (as the model printed them), stages
    from ``cost_model_h100.csv``."""
    text = results(root, "cost_model_h100.md").read_text(encoding="utf-8")
    total = {e: float(re.search(rf"^- {e}: \*\*([\d.]+) s/edit", text, re.M)[1])
             for e in ("reference", "fast")}
    ratio = re.search(r"^- ratio reference / fast: \*\*([\d.]+)×", text, re.M)[1]
    stage = {(r["stage"], r["engine"]): r for r in csv_rows(results(root, "cost_model_h100.csv"))}
    values = {e: stage["values: 12 steps", e]["bound"] for e in ("reference", "fast")}
    solve = {e: float(stage["solve (fp64)", e]["floor_ms"]) for e in ("reference", "fast")}
    stats = next(r for (s, _), r in stage.items() if re.fullmatch(r"statistics: \d+×\d+ tokens", s))
    return (f"Floors, not predictions: **reference {total['reference']:.3f} s/edit, fast "
            f"{total['fast']:.3f} s/edit ({ratio}×)**; the reference's value stage is "
            f"{values['reference']}-bound (each request's passes read all the weights for that "
            f"request's few prompts alone), the fast engine's {values['fast']}-bound; the "
            f"Woodbury solve is {stage['solve (fp64)', 'fast']['bound']}-bound "
            f"({solve['fast']:.1f} ms per batch vs {solve['reference']:.0f} ms for the direct "
            f"fp64 solves); statistics {float(stats['floor_ms']) / 1000:.1f} s once per model "
            f"({stats['stage'].split(': ')[1]}).")


@generator("distributed-cpu")
def distributed_cpu(root: Path) -> str:
    """The statistics pass on one process and on two (``distributed_cpu.csv``, one run)."""
    (r,) = csv_rows(results(root, "distributed_cpu.csv"))
    diff = f"{float(r['max_rel_diff']):.1e}".replace("e-0", "e-")
    return (f"`C0` of layers 4–8 of SmolLM2-135M over {r['texts']} WikiText-2 paragraphs: one "
            f"process of one thread {float(r['one_process_s']):.1f} s, {r['world']} processes "
            f"of one thread each (gloo, each rank its share of the texts, one all_reduce) "
            f"{float(r['distributed_s']):.1f} s: **{float(r['speedup']):.2f}×** (one run; each "
            f"rank also loads the model, and the shares differ in tokens); the two `C0` agree "
            f"to {diff} of their largest entry. Data-parallel editing sends per batch "
            f"{int(r['smollm2_batch_bytes']) / 1e6:.1f} MB for SmolLM2 at batch 50 (the "
            f"gathered values and rank 0's factors).")


@generator("refactor-23-speed", reflowed=False)
def refactor_speed(root: Path) -> str:
    """The refactor's engine speed, before and after, over the runs that had the machine alone
    (``refactor-23/alone.json`` names them, 1-based, with why the others are left out)."""
    folder = results(root, "refactor-23")
    alone = read_json(folder / "alone.json")
    cells = {}
    for side in ("before", "after"):
        rows = csv_rows(folder / f"engines_{side}.csv")
        picked = [rows[i - 1] for i in alone[side]]
        fast = [float(r["fast_s_per_edit"]) for r in picked]
        ref = [float(r["ref_s_per_edit"]) for r in picked]
        cells[side] = (f"rows {', '.join(map(str, alone[side]))}", fast, ref)
    lines = ["| | runs (machine alone) | fast s/edit | mean | reference s/edit |",
             "|---|---|---|---|---|"]
    for side, (runs, fast, ref) in cells.items():
        lines.append(f"| {side} | {runs} | {', '.join(f'{x:.3f}' for x in fast)} | "
                     f"{statistics.mean(fast):.3f} | {', '.join(f'{x:.2f}' for x in ref)} |")
    (_, fb, rb), (_, fa, ra) = cells["before"], cells["after"]
    lines += ["", f"Fast engine {min(fb):.3f}–{max(fb):.3f} s/edit before and "
                  f"{min(fa):.3f}–{max(fa):.3f} after; reference {min(rb):.2f}–{max(rb):.2f} "
                  f"and {min(ra):.2f}–{max(ra):.2f}."]
    return "\n".join(lines)

