"""Precision blocks: bf16 with fp32 masters against fp32 (``precision_cpu.csv``, 200 edits) and
the three modes over 1,000 edits (``precision_1000_cpu.csv``)."""

from __future__ import annotations

from pathlib import Path

from .registry import csv_rows, generator, results


def _by_variant(path: Path) -> dict[str, dict[str, float | str]]:
    """A precision CSV's rows by variant, numbers as floats."""
    out: dict[str, dict[str, float | str]] = {}
    for row in csv_rows(path):
        out[row["variant"]] = {k: _number(v) for k, v in row.items()}
    return out


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _points(x: float) -> str:
    """A difference of fractions in percentage points, signed: ``−2.0 pts``."""
    return f"{100 * x:+.1f} pts".replace("-", "−")


@generator("precision-cpu")
def precision_cpu(root: Path) -> str:
    """fp32 against bf16 with masters on 200 edits: time, steps and scores (one run of each, in
    one process), and how far apart the two editors' weights end."""
    v = _by_variant(results(root, "precision_cpu.csv"))
    a, b = v["fp32"], v["bf16"]

    def row(label: str, key: str, fmt: str, diff: str) -> str:
        return f"| {label} | {fmt.format(a[key])} | {fmt.format(b[key])} | {diff} |"

    top1 = ("efficacy", "paraphrase", "neighbourhood")
    lines = [
        "| | fp32 | bf16 + masters | |",
        "|---|---|---|---|",
        row("statistics pass (1,000 texts)", "stats_s",
            "{:.1f} s", f"**{a['stats_s'] / b['stats_s']:.2f}×**"),
        row("edits, end to end", "edit_s_per_edit", "{:.3f} s/edit",
            f"**{a['edit_s_per_edit'] / b['edit_s_per_edit']:.2f}×**"),
        row("of which value optimisation", "values_s_per_edit", "{:.3f}",
            f"{a['values_s_per_edit'] / b['values_s_per_edit']:.2f}×"),
        row("mean value steps", "mean_steps", "{:.2f}",
            f"{b['mean_steps'] - a['mean_steps']:+.2f}".replace("-", "−")),
    ]
    lines += [row(f"top-1 {k if k != 'neighbourhood' else 'neighbourhood unchanged'}", k,
                  "{:.1%}", _points(b[k] - a[k])) for k in top1]
    lines.append("| ES / PS / NS (probabilities) | "
                 + " | ".join(" / ".join(f"{100 * r[k]:.1f}" for k in ("es", "ps", "ns"))
                              for r in (a, b)) + " | |")
    worst = max(abs(b[k] - a[k]) for k in top1)
    lines += ["", f"All three top-1 scores within {100 * worst:.1f} points, mean steps within "
                  f"{abs(b['mean_steps'] - a['mean_steps']):.2f}; the end-to-end gain "
                  f"{a['edit_s_per_edit'] / b['edit_s_per_edit']:.2f}× (the target was 2×), the "
                  f"statistics pass {a['stats_s'] / b['stats_s']:.2f}×. The bf16 run's "
                  f"accumulated update differs from the fp32 run's by "
                  f"{b['rel_update_dist']:.0%} of its size (`rel_update_dist`), far above bf16 "
                  f"rounding (`floor_dist` {b['floor_dist']:.2f} vs `weight_dist` "
                  f"{b['weight_dist']:.1f})."]
    return "\n".join(lines).replace("%", " %")


@generator("precision-1000")
def precision_1000(root: Path) -> str:
    """fp32, bf16 with masters and bf16 without on the same 1,000 edits: scores, distance to the
    fp32 run, time (one run, partly beside a test suite)."""
    v = _by_variant(results(root, "precision_1000_cpu.csv"))
    fp32 = v["fp32"]
    floor = max(float(r["floor_dist"]) for r in v.values())
    label = {"fp32": "fp32", "bf16": "bf16 + masters", "bf16-no-masters": "bf16, no masters"}
    lines = [f"| | ES | PS | NS | ‖W − W_fp32‖ (floor {floor:.2f}) | rel. update distance | "
             "s/edit |", "|---|---|---|---|---|---|---|"]
    for name, r in v.items():
        dist = "0" if r["weight_dist"] == 0 else f"{r['weight_dist']:.1f}"
        rel = "0" if r["rel_update_dist"] == 0 else f"{r['rel_update_dist']:.3f}"
        sec = f"{r['edit_s_per_edit']:.2f}"
        if name == "bf16":
            sec += f" ({fp32['edit_s_per_edit'] / r['edit_s_per_edit']:.2f}×)"
        lines.append(f"| {label.get(name, name)} | {100 * r['es']:.1f} | {100 * r['ps']:.1f} | "
                     f"{100 * r['ns']:.1f} | {dist} | {rel} | {sec} |")
    on, off = v["bf16"], v["bf16-no-masters"]
    gap = max(abs(on[k] - off[k]) for k in ("es", "ps", "ns"))
    cost = " / ".join(f"{100 * (fp32[k] - on[k]):.1f}" for k in ("es", "ps", "ns"))
    lines += ["", f"With and without masters the scores are within {100 * gap:.1f} points and the "
                  f"distance to the fp32 run is {on['weight_dist']:.1f} against "
                  f"{off['weight_dist']:.1f}, against a bf16 rounding of the weights of "
                  f"{floor:.2f} over all five layers. bf16 with masters costs {cost} points of "
                  f"ES / PS / NS against fp32 at {int(fp32['edits']):,} edits."]
    return "\n".join(lines)
