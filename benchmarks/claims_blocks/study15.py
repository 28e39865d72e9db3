"""The 10,000-edit study of issue 15 (``study-smollm2-10k/``), run before the evaluation
protocol: what its files do not support (small samples, a miscalibrated collapse bound), its
runs and their table, and what the files still carry. Every number is read from the study's
``summary.json`` and each run's ``config.json``, ``results.jsonl`` (one line per batch) and
``evals.jsonl`` (one per evaluation), through :mod:`.study15_data`."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encore_fast.eval.downstream import TASKS
from encore_fast.eval.results import RunData, load_run

from .registry import (
    binomial_se,
    csv_rows,
    generator,
    less_time,
    num,
    pct,
    results,
    span,
    with_interval,
)
from .study15_data import (
    LABELS,
    MAIN,
    POINTS,
    STREAM,
    TASK_NAMES,
    at_edits,
    below,
    collapses,
    layer_norms,
    load_runs,
    many_classes,
    mean_norm,
    mean_steps,
    one_class_f1,
    ppl_ratio,
    quartiles,
    settings,
    summary_of,
    thousands,
    times,
    where,
)


@generator("study15-caveats")
def study15_caveats(root: Path) -> str:
    """What the study's files do not support: how many facts, examples and probes each point
    rests on, the chance level of its collapse bound, and the summary's own collapse points."""
    runs = load_runs(root, STREAM)
    enc, base = runs["encore"], runs["encore"].evals[0]
    n_at = {e["edits_done"]: e["metrics"]["n_records"] for e in enc.evals}
    first = at_edits(enc, 1000)["metrics"]
    down = base["downstream"]
    tasks = [t for t in down if t in TASKS]
    n_ex = {down[t]["n"] for t in tasks}
    se = [binomial_se(down[t]["acc"], down[t]["n"]) for t in tasks]
    mean_se = (sum(s * s for s in se) ** 0.5) / len(tasks)  # of the mean over the tasks
    known = len(base["known_correct"])
    probes = round(known / base["known_acc"])
    kept_se = [binomial_se(e["known_retained"], known) for e in enc.evals[1:]]
    levels = {t: one_class_f1(len(TASKS[t].labels)) for t in tasks}
    flat = [t for t in tasks if abs(down[t]["f1"] - levels[t]) < 1e-9]
    found = collapses(root, runs)
    old, right = found["encore"]["bounds"]
    by_down = [(n, found[n]["study"]) for n in STREAM
               if found[n]["study"] and found[n]["study"][1][0].startswith("downstream")
               and len(found[n]["study"][1]) == 1]
    margins = [f"{LABELS[n]} at {thousands(at)}: "
               f"{at_edits(runs[n], at)['downstream']['mean_f1']:.3f}, "
               f"{old - at_edits(runs[n], at)['downstream']['mean_f1']:.3f} below"
               for n, (at, _) in by_down]
    summary = summary_of(root)
    return "\n".join([
        f"* **Too few facts per point.** The sample of {n_at[0]} records was drawn from the "
        f"whole stream, so an evaluation scored only the sampled records already edited: "
        f"{n_at[1000]} at 1,000 edits (ENCORE's ES {with_interval(first['es'], n_at[1000])}, "
        f"realistic ES {with_interval(first['real_es'], n_at[1000])}, 95% Wilson intervals), "
        f"{n_at[5000]} at 5,000, {n_at[10000]} at 10,000; and no comparison between methods "
        f"was made fact by fact. Downstream tasks scored {span(n_ex, 0)} examples each "
        f"(standard error {span(se, 2)} per task, from the unedited model's accuracies); "
        f"\"known facts kept\" rests on the {known} of {probes} probes the unedited model knew "
        f"(standard error {span(kept_se, 2)} at ENCORE's points).",
        f"* **A wrong chance level.** The collapse bound took 1/3 as the weighted F1 of "
        f"one-class answers for every task; that holds for a balanced two-class task only (a "
        f"balanced k-class task gives 2/(k(k+1)): {', '.join(many_classes(base))}), so the "
        f"bound was {old:.3f} where it should have been {right:.3f}. "
        f"{' and '.join(TASK_NAMES[t] for t in flat)} sit at their one-class level on the "
        f"unedited model (F1 {levels[flat[0]]:.3f}) and carry no signal, yet they were in the "
        f"mean.",
        f"* **Margins inside the noise.** The collapse decisions by the downstream mean alone "
        f"turned on a few thousandths of F1 ({'; '.join(margins)} the bound of {old:.3f}), "
        f"against a standard error of about {mean_se:.2f} for that mean. With the corrected "
        f"bound and the study's own two-in-a-row rule: "
        + "; ".join(f"{LABELS[n]} {where(found[n]['right'])}{below(runs[n], right)}"
                    for n in STREAM) + ".",
        f"* **A headline its summary contradicts.** The prose said ENCORE made all "
        f"{thousands(summary['encore']['edits'])} edits \"without collapsing\", while "
        f"`summary.json` records ENCORE `collapsed_at` "
        f"{thousands(summary['encore']['collapsed_at'][0])} by the same rule that stopped "
        f"MEMIT-seq at {thousands(summary['memit-seq']['collapsed_at'][0])}. Speed ratios were "
        f"single runs without a range, and \"2 neighbourhood prompts per record\" was written "
        f"where the data has one.",
    ])


@generator("study15-runs")
def study15_runs(root: Path) -> str:
    """Each run: its settings, how far it went, its speed (median batch and quartiles), value
    updates, evaluation time, and where the collapse rule stops it with each chance level."""
    runs, summary = load_runs(root), summary_of(root)
    found = collapses(root, runs)
    lines = ["| run | settings | edits made / evaluated | s/edit, median batch (quartiles) | "
             "value updates per request | s per evaluation | collapsed (`summary.json`) | "
             "with the corrected bound |", "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        s, (q1, _, q3) = summary[name], quartiles(run)
        old, right = found[name]["bounds"]
        lines.append(
            f"| {LABELS[name]} | {settings(run)} | {thousands(s['edits'])} / "
            f"{thousands(s['evaluated_to'])} | {s['sec_per_edit']:.3f} ({q1:.3f}–{q3:.3f}) | "
            f"{mean_steps(run):.1f} | {span((e['seconds'] for e in run.evals), 0)} | "
            f"{where(found[name]['study'])}, bound {old:.3f} | "
            f"{where(found[name]['right'])}, bound {right:.3f} |")
    enc = runs["encore"]
    per_batch = [statistics.mean(b["steps"]) for b in enc.batches]
    later = [s for b, s in zip(enc.batches, per_batch, strict=True) if b["edits_done"] > 1000]
    stopped = [sum(b["mpes_stopped"]) for b in enc.batches]
    size = {b["n_requests"] for b in enc.batches}
    lines += ["", f"ENCORE's value updates: {per_batch[0]:.1f} per request in its first batch, "
                  f"{span(later, 1)} per batch (mean {statistics.mean(later):.1f}) from 1,000 "
                  f"edits on; MPES stopped {span(stopped, 0)} of each batch's {span(size, 0)} "
                  f"requests. The study's bound is 1/3 + half the unedited downstream mean's "
                  f"margin over 1/3; the corrected one uses each task's one-class F1 instead."]
    return "\n".join(lines)


@generator("study15-table")
def study15_table(root: Path) -> str:
    """The runs at the same points (``*/evals.jsonl``; norms from ``*/results.jsonl``), with the
    number of sampled facts each point scored and Wilson intervals where the scores are 0/1."""
    runs = load_runs(root, STREAM)
    base = runs["encore"].evals[0]
    first_n = at_edits(runs["encore"], 1000)["forgetting"]["n_records"]
    lines = [f"| method | edits | facts scored | ES | PS | NS | real ES | first 1k (n = "
             f"{thousands(first_n)}): ES / real ES | downstream mean / SST-2 / RTE F1 | "
             "perplexity | known facts (kept) | ‖W‖/‖W₀‖ mean (layer 8) |", "|" + "---|" * 12]

    def cells(line: dict[str, Any], run: RunData | None) -> str:
        m, d, n = line["metrics"], line["downstream"], line["metrics"]["n_records"]
        f = line.get("forgetting")
        first = "—" if not f else f"{f['es']:.2f} / {f['real_es']:.2f}"
        known = f"{line['known_acc']:.3f}"
        norm = "1"
        if run is not None:
            known += f" ({pct(line['known_retained'])})"
            norm = (f"{mean_norm(run, line['edits_done']):.3f} "
                    f"({layer_norms(run, line['edits_done'])[8]:.3f})")
        ppl = line["perplexity"]
        return (f"{n} | {with_interval(m['es'], n)} | {m['ps']:.2f} | {m['ns']:.2f} | "
                f"{with_interval(m['real_es'], n)} | {first} | {d['mean_f1']:.3f} / "
                f"{d['sst2']['f1']:.2f} / {d['rte']['f1']:.2f} | "
                f"{num(ppl, 0) if ppl >= 1000 else num(ppl, 1)} | {known} | {norm} |")

    lines.append(f"| unedited | 0 | {cells(base, None)}")
    for at in POINTS:
        for name, run in runs.items():
            if (line := at_edits(run, at)) is not None:
                lines.append(f"| {LABELS[name]} | {thousands(at)} | {cells(line, run)}")
    return "\n".join(lines)


@generator("study15-findings")
def study15_findings(root: Path) -> str:
    """What the study's files still carry: norm growth and perplexity at equal edits (exact,
    or the same 8,192 tokens for every run), AlphaEdit's norms against the 500-edit comparison,
    and the speeds, one run per method."""
    runs = load_runs(root, STREAM)
    enc, alp = runs["encore"], runs["alphaedit"]
    last = max(e["edits_done"] for e in enc.evals)

    def each_run(p: int, cell: Callable[[RunData], str]) -> str:
        """``at 1,000 edits: ENCORE <cell>, MEMIT-seq <cell>, ...`` (the runs that got there)."""
        return (f"at {thousands(p)} edits: "
                + ", ".join(f"{LABELS[n]} {cell(r)}" for n, r in runs.items() if at_edits(r, p)))

    norms = "; ".join(each_run(p, lambda r, p=p: f"{mean_norm(r, p):.3f}") for p in (1000, 3000))
    ppl = "; ".join(each_run(p, lambda r, p=p: f"×{times(ppl_ratio(r, p))}")
                    for p in (1000, 2000, 3000))
    grow = {n: mean_norm(r, 1000) - 1 for n, r in runs.items()}
    # AlphaEdit's first 500 edits here (bf16, batch 100) against the 500-edit comparison's run
    # (fp32, batch 50), at the edits both have
    ref = load_run(results(root, "compare-smollm2-500", "alphaedit"), "alphaedit")
    x_ref, r_ref = ref.norm_series()
    x_alp, r_alp = alp.norm_series()
    common = [e for e in x_alp if e and e in x_ref and e <= 500]
    gaps = [abs(r_alp[k][x_alp.index(e)] / r_ref[k][x_ref.index(e)] - 1)
            for e in common for k in r_alp]
    ref_500 = statistics.mean(series[x_ref.index(500)] for series in r_ref.values())
    upto = min(max(b["edits_done"] for b in runs[n].batches) for n in MAIN)
    speed = {n: quartiles(runs[n], upto) for n in MAIN}
    steps = {n: mean_steps(runs[n], upto) for n in MAIN}
    methods = {r["method"]: float(r["s_per_edit"])
               for r in csv_rows(results(root, "methods_cpu.csv"))}
    base = enc.evals[0]
    examples = [d["n"] for k, d in base["downstream"].items() if k in TASKS]
    return "\n".join([
        f"* **Norms** (exact, every batch): mean ‖W‖/‖W₀‖ {norms}; "
        f"ENCORE after {thousands(last)} edits: {mean_norm(enc, last):.3f}. At 1,000 edits "
        f"MEMIT-seq's growth is {grow['memit-seq'] / grow['encore']:.1f}× ENCORE's, "
        f"AlphaEdit's {grow['alphaedit'] / grow['encore']:.1f}× (α 10: "
        f"{grow['alphaedit-a10'] / grow['encore']:.1f}×). AlphaEdit's norms grow faster and faster "
        f"({', '.join(f'{mean_norm(alp, p):.2f} at {thousands(p)}' for p in (500, 1000, 2000))}"
        f"); bf16 and batch 100 do not explain its start: to 500 edits its per-layer norms "
        f"follow those of the fp32, batch-50 run of the 500-edit comparison within "
        f"{pct(statistics.mean(gaps), 1)} on average ({mean_norm(alp, 500):.3f} against "
        f"{ref_500:.3f} at 500).",
        f"* **Perplexity** (the same 8,192 tokens for every run), against the unedited model's, "
        f"{ppl}; ENCORE ×{times(ppl_ratio(enc, last))} at {thousands(last)}.",
        f"* **Speed**, one run per method with the machine alone, so no run-to-run range: "
        f"median batch over the first {thousands(upto)} edits (as far as every run went): "
        + ", ".join(f"{LABELS[n]} {speed[n][1]:.3f} s/edit (quartiles {speed[n][0]:.3f}–"
                    f"{speed[n][2]:.3f})" for n in MAIN)
        + f"; ENCORE {less_time(speed['encore'][1], speed['memit-seq'][1])} / "
        f"{less_time(speed['encore'][1], speed['alphaedit'][1])} less time per edit, with "
        f"{steps['encore']:.1f} value updates per request against {steps['memit-seq']:.1f} / "
        f"{steps['alphaedit']:.1f}. Side by side on the "
        f"first batch alone (`methods_cpu.csv`, one run), where MPES saves less: "
        f"{less_time(methods['encore'], methods['memit-seq'])} / "
        f"{less_time(methods['encore'], methods['alphaedit'])}.",
        f"* **Not carried**: the edit scores, realistic accuracy, downstream F1 and known facts "
        f"of the table rest on {span((e['metrics']['n_records'] for e in enc.evals[1:]), 0)} "
        f"sampled facts, {span(examples, 0)} examples per task and "
        f"{len(base['known_correct'])} known probes; a "
        f"difference of a few points between methods at a point is within that noise.",
    ])
