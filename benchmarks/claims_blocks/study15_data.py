"""The runs of the 10,000-edit study (``study-smollm2-10k/``) as the claims blocks read them:
the runs' files loaded, norms and perplexity at a point, batch speeds, and the study's collapse
rule recomputed from the evaluations with either chance level (the study's 1/3 for every task,
or each task's own one-class F1)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encore_fast.eval.downstream import TASKS
from encore_fast.eval.results import RunData, load_run

from .registry import num, read_json, results

FOLDER = "study-smollm2-10k"
LABELS = {"encore": "ENCORE", "memit-seq": "MEMIT-seq", "alphaedit": "AlphaEdit",
          "alphaedit-a10": "AlphaEdit α 10", "encore-preset": "ENCORE, preset"}
STREAM = ("encore", "memit-seq", "alphaedit", "alphaedit-a10")  # the runs of the stream itself
MAIN = ("encore", "memit-seq", "alphaedit")
POINTS = (1000, 2000, 3000, 4000, 5000, 10000)  # the table's rows (where a run has them)
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "rte": "RTE", "nli": "NLI",
              "mmlu": "MMLU"}
STUDY_CHANCE = 1 / 3  # what the study took as every task's one-class weighted F1


def thousands(n: int) -> str:
    return f"{n:,}"


def times(x: float) -> str:
    """A ratio at a sensible precision: ``1.08``, ``56.3``, ``1,052``."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def one_class_f1(k: int) -> float:
    """Weighted F1 of always answering one class on a balanced ``k``-class task: the class
    answered has precision 1/k and recall 1 (F1 2/(k+1)) and weight 1/k; the others score 0."""
    return 2 / (k * (k + 1))


def many_classes(line: dict[str, Any]) -> list[str]:
    """The one-class F1 of a line's tasks with more than two classes: ``MMLU's 4 classes 0.10``."""
    return [f"{TASK_NAMES[t]}'s {len(TASKS[t].labels)} classes give "
            f"{one_class_f1(len(TASKS[t].labels)):.2f}"
            for t in line["downstream"] if t in TASKS and len(TASKS[t].labels) > 2]


def summary_of(root: Path) -> dict[str, Any]:
    return read_json(results(root, FOLDER, "summary.json"))


def load_runs(root: Path, names: Sequence[str] = tuple(LABELS)) -> dict[str, RunData]:
    return {n: load_run(results(root, FOLDER, n), n) for n in names}


def at_edits(run: RunData, edits: int) -> dict[str, Any] | None:
    return next((e for e in run.evals if e["edits_done"] == edits), None)


def layer_norms(run: RunData, edits: int) -> dict[int, float]:
    """``‖W‖/‖W₀‖`` per edited layer after ``edits`` edits."""
    x, ratios = run.norm_series()
    i = x.index(edits)
    return {layer: series[i] for layer, series in ratios.items()}


def mean_norm(run: RunData, edits: int) -> float:
    return statistics.mean(layer_norms(run, edits).values())


def ppl_ratio(run: RunData, edits: int) -> float:
    return at_edits(run, edits)["perplexity"] / run.evals[0]["perplexity"]


def chance_level(line: dict[str, Any]) -> float:
    """The right chance level of a line's downstream mean: each task's one-class F1, averaged."""
    tasks = [t for t in line["downstream"] if t in TASKS]
    return statistics.mean(one_class_f1(len(TASKS[t].labels)) for t in tasks)


def bound(run: RunData, chance: float) -> float:
    """The study's downstream bound: ``chance`` plus half the unedited model's margin over it."""
    d0 = run.evals[0]["downstream"]["mean_f1"]
    return chance + 0.5 * (d0 - chance)


def _reasons(run: RunData, line: dict[str, Any], chance: float) -> list[str]:
    """The study's collapse criteria that ``line`` meets, with the chance level ``chance``."""
    base, why = run.evals[0], []
    if line["edits_done"] and line["metrics"]["es"] <= base["metrics"]["es"]:
        why.append(f"ES {line['metrics']['es']:.2f}")
    d = line["downstream"]["mean_f1"]
    if d < bound(run, chance):
        why.append(f"downstream mean F1 {d:.3f}")
    if line["perplexity"] > 10 * base["perplexity"]:
        why.append(f"perplexity {num(line['perplexity'], 0)}")
    return why


def collapse(run: RunData, chance: float) -> tuple[int, list[str]] | None:
    """The study's rule: the first evaluation meeting a criterion with the next one meeting one
    too (None: never); checked against ``summary.json`` for the study's own chance level."""
    lines = run.evals
    for line, after in zip(lines, lines[1:], strict=False):
        if (why := _reasons(run, line, chance)) and _reasons(run, after, chance):
            return line["edits_done"], why
    return None


def collapses(root: Path, runs: dict[str, RunData]) -> dict[str, dict[str, Any]]:
    """Per run: the study's collapse point (as ``summary.json`` has it) and the corrected one."""
    summary, out = summary_of(root), {}
    for name, run in runs.items():
        study, right = collapse(run, STUDY_CHANCE), collapse(run, chance_level(run.evals[0]))
        recorded = summary[name]["collapsed_at"]
        if (study and study[0]) != (recorded and recorded[0]):
            raise ValueError(f"{name}: the recomputed collapse {study} is not summary.json's "
                             f"{recorded}")
        out[name] = {"study": study, "right": right,
                     "bounds": (bound(run, STUDY_CHANCE), bound(run, chance_level(run.evals[0])))}
    return out


def where(found: tuple[int, list[str]] | None) -> str:
    return "none" if found is None else f"{thousands(found[0])} ({'; '.join(found[1])})"


def below(run: RunData, level: float) -> str:
    """`` (below it at 4,000, its last evaluation)``: where a run that has not collapsed by the
    rule still has its downstream mean under ``level`` ("" where it has collapsed, or never)."""
    if collapse(run, chance_level(run.evals[0])) is not None:
        return ""
    under = [e["edits_done"] for e in run.evals if e["downstream"]["mean_f1"] < level]
    if not under:
        return ""
    last = ", its last evaluation" if under[-1] == run.evals[-1]["edits_done"] else ""
    return f" (below it at {', '.join(thousands(u) for u in under)}{last})"


def settings(run: RunData) -> str:
    """The run's tuned settings, from its ``config.json``."""
    hp = run.config["hparams"]
    if run.config["method"] == "alphaedit":
        return f"α {hp['alpha']:g}, τ {hp['null_space_threshold']:g}"
    out = f"λ_p {hp['lambda_p']:g}"
    if run.config["method"] == "encore":
        out += f", λ_n {hp['lambda_n']:g}, MPES +{hp['mpes_extra_steps']}"
    return out


def quartiles(run: RunData, upto: int | None = None) -> tuple[float, float, float]:
    """Seconds per edit of the run's batches (the first ``upto`` edits): quartiles."""
    per = [b["seconds"] / b["n_requests"] for b in run.batches
           if upto is None or b["edits_done"] <= upto]
    q1, q2, q3 = statistics.quantiles(per, n=4)
    return q1, statistics.median(per), q3


def mean_steps(run: RunData, upto: int | None = None) -> float:
    return statistics.mean(s for b in run.batches if upto is None or b["edits_done"] <= upto
                           for s in b["steps"])
