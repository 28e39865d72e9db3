"""How the long-stream preset for SmolLM2 was found (``study-smollm2-10k/``): the run with the
short-stream preset that degraded (``encore-preset/``), the tuning on ``counterfact-train.json``
that replaced it (``tuning.md``, ``tuning.csv``, ``tune/*/evals.jsonl``), and the README's two
paragraphs on the preset and on the study (which carry its caveats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encore_fast.config import PRESETS

from .registry import (
    csv_rows,
    generator,
    jsonl,
    less_time,
    pct,
    read_json,
    results,
    with_interval,
)
from .study15_data import (
    FOLDER,
    MAIN,
    STREAM,
    at_edits,
    collapses,
    layer_norms,
    load_runs,
    many_classes,
    mean_norm,
    ppl_ratio,
    quartiles,
    summary_of,
    thousands,
    times,
    where,
)

TUNED = ("lambda_p", "lambda_n", "mpes_extra_steps")


def _tuning(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``tuning.csv``: the unedited row, then one row per setting (numbers as floats), each with
    the number of sampled records and known probes its last evaluation scored."""
    rows: list[dict[str, Any]] = []
    for r in csv_rows(results(root, FOLDER, "tuning.csv")):
        rows.append({k: (v if k == "run" else float(v) if v else None) for k, v in r.items()})
    for r in rows[1:]:
        evals = jsonl(results(root, FOLDER, "tune", r["run"], "evals.jsonl"))
        r["n"] = evals[-1]["metrics"]["n_records"]
        r["probes"] = len(evals[0]["known_correct"])
    return rows[0], rows[1:]


def _setting(rows: list[dict[str, Any]], **want: float) -> dict[str, Any]:
    """The one row tried with the settings ``want``."""
    (row,) = [r for r in rows if all(r[k] == v for k, v in want.items())]
    return row


def _preset(name: str) -> dict[str, float]:
    return {k: float(PRESETS[name]["encore"][k]) for k in TUNED}


def _picked(root: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row ``tuning.md`` names as picked; it must be the stream preset's setting."""
    text = results(root, FOLDER, "tuning.md").read_text(encoding="utf-8")
    name = text.rsplit("least perplexity growth): ", 1)[1].split()[0]
    row = next(r for r in rows if r["run"] == name)
    if {k: row[k] for k in TUNED} != _preset("smollm2-135m-stream"):
        raise ValueError(f"tuning.md picked {name}, not preset smollm2-135m-stream's setting")
    return row


@generator("study15-preset")
def study15_preset(root: Path) -> str:
    """ENCORE with the short-stream preset on the study's stream (``encore-preset/``): how far it
    went, how it degraded, and where the collapse rule puts it with each chance level."""
    run = load_runs(root, ["encore-preset"])["encore-preset"]
    s = summary_of(root)["encore-preset"]
    found = collapses(root, {"encore-preset": run})["encore-preset"]
    pts = [1000, 5000, s["evaluated_to"]]
    at = {p: at_edits(run, p) for p in pts}
    n1 = at[1000]["metrics"]["n_records"]

    def k(p: int) -> str:
        return f"{p // 1000}k"

    return (f"Stopped at {thousands(s['edits'])} edits, evaluated to "
            f"{thousands(s['evaluated_to'])}. **With the preset ENCORE degrades at this scale**: "
            f"perplexity {run.evals[0]['perplexity']:.1f} → "
            + " → ".join(f"{at[p]['perplexity']:.0f} ({k(p)})" for p in pts)
            + f", realistic rewrite accuracy "
            f"{with_interval(at[1000]['metrics']['real_es'], n1)} at 1k (n = {n1}) and "
            + " / ".join(f"{at[p]['metrics']['real_es']:.2f}" for p in pts[1:])
            + f" at {' / '.join(k(p) for p in pts[1:])}, ES on the first 1,000 facts "
            + " → ".join(f"{at[p]['forgetting']['es']:.2f} ({k(p)})" for p in pts)
            + ", mean norm growth "
            + " → ".join(f"{mean_norm(run, p):.3f} ({k(p)})" for p in (1000, pts[-1]))
            + f". By the study's rule (bound {found['bounds'][0]:.3f}) `summary.json` marks it "
            f"collapsed at {where(found['study'])}; with the corrected bound "
            f"({found['bounds'][1]:.3f}) at {where(found['right'])}.")


@generator("study15-tuning")
def study15_tuning(root: Path) -> str:
    """The tuning table as ``study_report.py --tune`` wrote it (``tuning.md``), then what it
    shows, setting against setting."""
    table = results(root, FOLDER, "tuning.md").read_text(encoding="utf-8").strip()
    _, rows = _tuning(root)
    pick, preset = _picked(root, rows), _setting(rows, **_preset("smollm2-135m"))
    m = pick["mpes_extra_steps"]
    pairs = sorted({r["lambda_p"] for r in rows if r["mpes_extra_steps"] == m}
                   & {r["lambda_p"] for r in rows if r["lambda_n"] == preset["lambda_n"]})
    lo_n, hi_n = preset["lambda_n"], pick["lambda_n"]
    low = [_setting(rows, lambda_p=p, lambda_n=lo_n, mpes_extra_steps=m) for p in pairs]
    high = [_setting(rows, lambda_p=p, lambda_n=hi_n, mpes_extra_steps=m) for p in pairs]
    line = sorted((r for r in rows if r["lambda_n"] == hi_n and r["mpes_extra_steps"] == m),
                  key=lambda r: r["lambda_p"])
    a, b = line[0], line[-1]
    more = [r for r in rows if r["lambda_p"] == pick["lambda_p"]
            and r["lambda_n"] == hi_n and r["mpes_extra_steps"] != m]

    def each(rs: list[dict[str, Any]], key: str, digits: int = 3) -> str:
        return " / ".join(f"{r[key]:.{digits}f}" for r in rs)

    ps = " / ".join(f"{p:g}" for p in pairs)
    text = (f"What it shows ({pick['n']} sampled records per run, {pick['probes']} known "
            f"probes): λ_n is what holds the norms (λ_n {hi_n:g} against {lo_n:g}: growth "
            f"{each(high, 'norm_growth')} against {each(low, 'norm_growth')} at λ_p {ps}) and "
            f"the downstream mean ({each(high, 'downstream_f1')} against "
            f"{each(low, 'downstream_f1')}); λ_p trades edit strength for everything else (at "
            f"λ_n {hi_n:g}, λ_p {a['lambda_p']:g} → {b['lambda_p']:g}: ES {a['es']:.2f} → "
            f"{b['es']:.2f}, perplexity growth {pct(a['ppl_ratio'] - 1)} → "
            f"{pct(b['ppl_ratio'] - 1)}, known facts kept {pct(a['known_retained'])} → "
            f"{pct(b['known_retained'])})")
    for r in more:
        text += (f"; MPES +{r['mpes_extra_steps']:g} against +{m:g}: ES {r['es']:.2f} against "
                 f"{pick['es']:.2f}, realistic ES {r['real_es']:.2f} against "
                 f"{pick['real_es']:.2f}, perplexity ×{r['ppl_ratio']:.3f} against "
                 f"×{pick['ppl_ratio']:.3f}")
    text += (f". **Chosen by the rule: `{pick['run']}`** (λ_p {pick['lambda_p']:g}, λ_n "
             f"{pick['lambda_n']:g}, MPES +{m:g}) — ES {with_interval(pick['es'], pick['n'])} "
             f"(the preset's {with_interval(preset['es'], preset['n'])}) for perplexity "
             f"+{pct(pick['ppl_ratio'] - 1, 1)} against +{pct(preset['ppl_ratio'] - 1, 1)} and "
             f"known facts kept {with_interval(pick['known_retained'], pick['probes'])} against "
             f"{with_interval(preset['known_retained'], preset['probes'])}.")
    return table + "\n\n" + text


@generator("readme-stream-preset")
def readme_stream_preset(root: Path) -> str:
    """The README's paragraph on the long-stream preset: the preset's cost at 1,000 edits and
    the chosen setting's, from the tuning (``tuning.csv``)."""
    _, rows = _tuning(root)
    pick, preset = _picked(root, rows), _setting(rows, **_preset("smollm2-135m"))
    cfg = read_json(results(root, FOLDER, "tune", pick["run"], "config.json"))
    sets = " ".join(f"--set {k}={v:g}" for k, v in pick.items() if k in TUNED[:2])
    return (f"**For thousands of sequential edits** the preset's λ_p {preset['lambda_p']:g} is "
            f"too weak: by {thousands(int(preset['edits']))} edits the summed keys of earlier "
            f"edits outweigh `λ_p C0` and the model's other text pays (perplexity "
            f"+{pct(preset['ppl_ratio'] - 1)}, {pct(1 - preset['known_retained'])} of known facts "
            f"lost at {thousands(int(preset['edits']))} edits). Tuned on `counterfact-train.json` "
            f"({thousands(cfg['num_edits'])} edits, batch {cfg['batch_size']}, scores on "
            f"{pick['n']} sampled records and {pick['probes']} known probes; table in "
            f"`benchmarks/results/README.md`, \"Tuning\"): **`{sets}`** keeps ES "
            f"{with_interval(pick['es'], pick['n'])} with perplexity "
            f"+{pct(pick['ppl_ratio'] - 1)} and {pct(pick['known_retained'])} of known facts; the "
            f"10,000-edit study used it. It is the preset **`smollm2-135m-stream`** "
            f"(`Editor(..., preset=\"smollm2-135m-stream\")`, CLI `--preset "
            f"smollm2-135m-stream`); `smollm2-135m`, what a model named SmolLM2 gets by default, "
            f"stays the one for a few edits (the higher λ_p edits less strongly: ES "
            f"{preset['es']:.2f} against {pick['es']:.2f} in that table).")


@generator("readme-study15")
def readme_study15(root: Path) -> str:
    """The README's paragraph on the 10,000-edit study: what it ran, why its conclusions do not
    stand, and what its files still carry (norms, perplexity, one run's speed per method)."""
    runs, summary = load_runs(root, STREAM), summary_of(root)
    found = collapses(root, runs)
    enc, mem, alp, a10 = (runs[n] for n in STREAM)
    last = summary["encore"]["edits"]
    n_at = {e["edits_done"]: e["metrics"]["n_records"] for e in enc.evals}
    base, end = enc.evals[0], at_edits(enc, last)
    grow = {n: mean_norm(r, 1000) - 1 for n, r in runs.items()}
    old, right = found["encore"]["bounds"]
    upto = min(summary[n]["edits"] for n in MAIN)
    med = {n: quartiles(runs[n], upto)[1] for n in MAIN}
    methods = {r["method"]: float(r["s_per_edit"])
               for r in csv_rows(results(root, "methods_cpu.csv"))}
    less = " / ".join(less_time(med["encore"], med[n]) for n in ("memit-seq", "alphaedit"))
    side = " / ".join(less_time(methods["encore"], methods[n]) for n in ("memit-seq", "alphaedit"))
    return (
        f"The 10,000-edit study (issue 15; `benchmarks/results/README.md`, \"The 10,000-edit "
        f"study\") ran ENCORE with it over all {thousands(last)} edits of "
        f"`counterfact-edit.json`, MEMIT-seq (same λ_p) to "
        f"{thousands(summary['memit-seq']['edits'])} and AlphaEdit (its preset) to "
        f"{thousands(summary['alphaedit']['edits'])}. **Its "
        f"conclusions do not stand**: it predates the project's evaluation protocol; each point "
        f"scored only the sampled facts edited so far ({n_at[1000]} at 1,000 edits, "
        f"{n_at[last]} at {thousands(last)}) and each downstream task "
        f"{base['downstream']['sst2']['n']} examples; its collapse bound took 1/3 as every "
        f"task's one-class F1, right for balanced two-class tasks only "
        f"({', '.join(many_classes(base))}), so the bound was {old:.3f} instead of "
        f"{right:.3f}; and by the rule "
        f"that stopped MEMIT-seq at {thousands(found['memit-seq']['study'][0])}, its own "
        f"`summary.json` marks ENCORE collapsed at {thousands(found['encore']['study'][0])}. It "
        f"is being redone with intervals and paired samples. What its files still carry is what "
        f"was not sampled: at 1,000 edits the edited matrices' mean norm grew "
        f"{grow['memit-seq'] / grow['encore']:.1f}× as much under MEMIT-seq as under ENCORE "
        f"and {grow['alphaedit'] / grow['encore']:.1f}× under AlphaEdit (with α 10: "
        f"{grow['alphaedit-a10'] / grow['encore']:.1f}×); perplexity grew "
        f"×{times(ppl_ratio(alp, 2000))} under AlphaEdit by 2,000 edits (with α 10: "
        f"×{times(ppl_ratio(a10, 2000))}), ×{times(ppl_ratio(mem, summary['memit-seq']['edits']))} "
        f"under MEMIT-seq by {thousands(summary['memit-seq']['edits'])} and "
        f"×{times(ppl_ratio(enc, last))} under ENCORE by {thousands(last)}, where its mean "
        f"‖W‖/‖W₀‖ was {mean_norm(enc, last):.3f} (layer 8: {layer_norms(enc, last)[8]:.3f}). Its "
        f"cost to ENCORE at {thousands(last)} edits, on those small samples: SST-2 F1 "
        f"{base['downstream']['sst2']['f1']:.2f} → {end['downstream']['sst2']['f1']:.2f} "
        f"({end['downstream']['sst2']['n']} examples), known "
        f"facts {base['known_acc']:.3f} → {end['known_acc']:.3f} (of "
        f"{round(len(base['known_correct']) / base['known_acc'])} probes), greedy generation "
        f"giving the new target for {with_interval(end['metrics']['real_es'], n_at[last])} of "
        f"the {n_at[last]} sampled edits. Speed, one run per method: over the first "
        f"{thousands(upto)} edits ENCORE's median batch took {less} less time per edit than "
        f"MEMIT-seq's / AlphaEdit's ({side} side by side on the first batch, "
        f"`benchmarks/bench_methods.py`, one run).")

