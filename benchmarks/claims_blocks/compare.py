"""The 500-edit comparison of ENCORE, MEMIT and AlphaEdit (``compare-smollm2-500/``): its table
(``table.csv``), what the runs' batches and evaluations add (``<method>/results.jsonl``), and the
README's short version."""

from __future__ import annotations

import statistics
from pathlib import Path

from encore_fast.eval.results import RunData, load_run

from .registry import csv_rows, generator, pct, read_json, results, span
from .speed import NAMES

FOLDER = "compare-smollm2-500"


def _table(root: Path) -> list[dict[str, float | str]]:
    """``table.csv``'s rows, numbers as floats."""
    return [{k: (v if k == "run" else float(v)) for k, v in r.items()}
            for r in csv_rows(results(root, FOLDER, "table.csv"))]


def _runs(root: Path, names: list[str]) -> dict[str, RunData]:
    return {n: load_run(results(root, FOLDER, n), n) for n in names}


def _name(run: str) -> str:
    return NAMES.get(run, run)


@generator("compare-500")
def compare_500(root: Path) -> str:
    """The comparison's table, the sample it scores, and each method's batch times and value
    steps (ENCORE's first batches shared the machine, so the whole-run s/edit alone misleads)."""
    rows = _table(root)
    runs = _runs(root, [str(r["run"]) for r in rows])
    lines = ["| run | ES | PS | NS | S | ppl before → after | known facts before → after "
             "(retained) | ‖W‖/‖W0‖ | s/edit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['es']:.2f} | {r['ps']:.2f} | {r['ns']:.2f} | {r['s']:.3f} | "
            f"{r['ppl_before']:.1f} → {r['ppl_after']:.1f} (×{r['ppl_ratio']:.2f}) | "
            f"{r['known_before']:.2f} → {r['known_after']:.2f} ({pct(r['known_retained'])}) | "
            f"{r['norm_growth']:.3f} | {r['sec_per_edit']:.2f} |")
    first = next(iter(runs.values()))
    base = first.evals[0]
    m = base["metrics"]
    probes = round(len(base["known_correct"]) / base["known_acc"])
    times, steps = [], []
    for name, run in runs.items():
        per = [b["seconds"] for b in run.batches]
        size = run.batches[0]["n_requests"]
        times.append(f"{_name(name)} {span(per, 0)} s (median {statistics.median(per):.0f})")
        steps.append((name, statistics.mean(s for b in run.batches for s in b["steps"])))
    cap = read_json(results(root, FOLDER, "encore", "config.json"))["hparams"]["v_num_grad_steps"]
    no_mpes = [(n, s) for n, s in steps if n != "encore"]
    lines += ["", f"(Every evaluation scores the same {m['n_records']} sampled records; before any "
                  f"edit they score ES {m['es']:.2f}, PS {m['ps']:.2f}, NS {m['ns']:.2f}. Known "
                  f"facts: {probes} probes.) s/edit is the whole run's wall time over its edits; "
                  f"per batch of {size}: {', '.join(times)}. ENCORE's first batches shared the "
                  f"two cores with other work. MEMIT and AlphaEdit have no MPES: "
                  f"{' and '.join(f'{s:.1f}' for _, s in no_mpes)} value steps per request on "
                  f"average (at most {cap}) against ENCORE's {dict(steps)['encore']:.1f}."]
    return "\n".join(lines)


@generator("compare-500-findings")
def compare_500_findings(root: Path) -> str:
    """Norm growth, perplexity and known facts after 500 edits, each method against ENCORE."""
    rows = {str(r["run"]): r for r in _table(root)}
    others = [n for n in rows if n != "encore"]
    enc = rows["encore"]
    grow = {n: r["norm_growth"] - 1 for n, r in rows.items()}
    _, ratios = _runs(root, ["alphaedit"])["alphaedit"].norm_series()
    layer = max(ratios, key=lambda k: ratios[k][-1])
    least = min(rows, key=lambda n: rows[n]["ppl_ratio"])
    most = max(rows, key=lambda n: rows[n]["known_retained"])
    return (f"After {int(enc['edits'])} edits the edited matrices' mean norm grew by "
            + " and ".join(f"{pct(grow[n], 1)} for {_name(n)}" for n in others)
            + f" (AlphaEdit's most on layer {layer}: ×{ratios[layer][-1]:.3f}) and by "
            f"{pct(grow['encore'], 1)} for ENCORE, "
            + " and ".join(f"{grow['encore'] / grow[n]:.2f}" for n in others)
            + f" of theirs. Perplexity grew least for {_name(least)} ("
            + ", ".join(f"{_name(n)} ×{r['ppl_ratio']:.2f}" for n, r in rows.items())
            + f") and {_name(most)} kept the most known facts ("
            + ", ".join(f"{_name(n)} {pct(r['known_retained'])}" for n, r in rows.items())
            + ").")


@generator("readme-compare-500")
def readme_compare_500(root: Path) -> str:
    """The README's short table of the 500-edit comparison (``table.csv``)."""
    rows = _table(root)
    n = _runs(root, ["encore"])["encore"].evals[0]["metrics"]["n_records"]
    lines = [f"{int(rows[0]['edits'])} sequential CounterFact edits per method "
             f"(`benchmarks/results/compare-smollm2-500/`; scores on a fixed sample of {n} of "
             "the edited records, no intervals):", "",
             "| method | S (ES/PS/NS) | perplexity × | known facts retained | ‖W‖/‖W0‖ |",
             "|---|---|---|---|---|"]
    lines += [f"| {_name(str(r['run']))} | {r['s']:.2f} ({r['es']:.2f}/{r['ps']:.2f}/"
              f"{r['ns']:.2f}) | {r['ppl_ratio']:.2f} | {pct(r['known_retained'])} | "
              f"{r['norm_growth']:.3f} |" for r in rows]
    return "\n".join(lines)
