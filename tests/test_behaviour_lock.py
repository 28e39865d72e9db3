"""Behaviour locked across refactors: fp32 weights of every method on both engines through
edit, undo, save, load and more edits, against values recorded before a refactor.

``tests/data/behaviour_lock.json`` holds, per case and stage, the SHA-256 of the edited
matrices' fp32 bytes (exact, checked on the machine kind that recorded it: same CPU model and
torch version, one thread) and 16 seeded random projections of the edit ``W - W0`` per layer
(checked everywhere, to 1e-4 of the edit's scale: another CPU's BLAS rounds differently).
Record a new machine's hashes with ``ENCORE_FAST_RECORD_LOCK=1`` -- only from code whose
behaviour has not changed since the file was first written (its git history says when).

Files written before a refactor (an edits file with every batch, a compact one with a base,
and a run folder) sit in ``tests/data/legacy/`` and must still load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from helpers import FAST

from encore_fast.editor import Editor
from encore_fast.eval.datasets import EvalRecord
from encore_fast.requests import EditRequest

DATA = Path(__file__).parent / "data"
LOCK = DATA / "behaviour_lock.json"
LEGACY = DATA / "legacy"
METHODS = ("encore", "memit", "memit-seq", "alphaedit")
ENGINES = ("reference", "fast")
CORPUS = [
    "The river runs past the old mill and into the valley below the town.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "She played the violin in an orchestra that toured across Europe each summer.",
    "The company was founded in 1998 and makes software for hospitals.",
    "Mount Everest is the highest mountain on Earth, on the border of Nepal.",
    "He studied chemistry at the university before he became a teacher.",
    "The novel was translated into twenty languages within a year of its release.",
    "Football is the most popular sport in Brazil and in much of Europe.",
] * 3
FACTS = [  # (prompt, subject, true, new)
    ("The capital of France is", "France", "Paris", "Rome"),
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux", "French", "English"),
    ("Toko Yasuda plays the", "Toko Yasuda", "guitar", "piano"),
    ("The Eiffel Tower is located in", "The Eiffel Tower", "Paris", "London"),
    ("Apple was founded by", "Apple", "Steve Jobs", "Bill Gates"),
    ("The official language of Brazil is", "Brazil", "Portuguese", "Spanish"),
]
SETTINGS = {**FAST, "null_space_threshold": 0.5, "null_space_relative": True}


def requests(start: int, n: int) -> list[EditRequest]:
    return [EditRequest(p, s, new, true, case_id=start + i)
            for i, (p, s, true, new) in enumerate(FACTS[start : start + n])]


def machine_key() -> str:
    """Which machine kind exact hashes hold for: CPU model, torch version (one thread)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | torch {torch.__version__}"


def edited(ed: Editor) -> dict[int, torch.Tensor]:
    return {l: ed.edited_weight(l).detach().float().clone() for l in ed.hparams.layers}


def digest(weights: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for l in sorted(weights):
        h.update(weights[l].contiguous().numpy().tobytes())
    return h.hexdigest()


def projections(weights: dict[int, torch.Tensor], w0: dict[int, torch.Tensor]) -> dict:
    """16 seeded Gaussian projections of each layer's edit, and the edit's norm."""
    out = {}
    for l in sorted(weights):
        delta = (weights[l] - w0[l]).double().flatten()
        g = torch.Generator().manual_seed(1000 + l)
        p = torch.randn(16, delta.numel(), generator=g, dtype=torch.float64) / delta.numel() ** .5
        out[str(l)] = {"norm": float(delta.norm()), "proj": (p @ delta).tolist()}
    return out


def stages(model, tokenizer, method: str, engine: str, tmp: Path) -> dict[str, dict]:
    """edit 2 + edit 2 -> undo -> save -> load in a fresh editor -> edit 2 more."""
    def make(m):
        return Editor(m, tokenizer, method, preset=None, engine=engine, corpus=CORPUS,
                      stats_cache=False, progress=False, history=None, **SETTINGS)

    ed = make(copy.deepcopy(model))
    w0 = edited(ed)
    seen = {}
    ed.edit(requests(0, 2))
    seen["edit1"] = edited(ed)
    ed.edit(requests(2, 2))
    seen["edit2"] = edited(ed)
    ed.undo()
    seen["undo"] = edited(ed)
    path = ed.save_edits(tmp / f"{method}-{engine}.safetensors")
    ed.release()
    fresh = make(copy.deepcopy(model))
    fresh.load_edits(path)
    seen["load"] = edited(fresh)
    fresh.edit(requests(4, 2))
    seen["more"] = edited(fresh)
    fresh.release()
    return {k: {"sha256": digest(w), "edit": projections(w, w0)} for k, w in seen.items()}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_weights_match_the_recorded_behaviour(method, engine, tiny_models, tokenizer, tmp_path,
                                              one_thread):
    got = stages(tiny_models["llama"], tokenizer, method, engine, tmp_path)
    assert got["undo"]["sha256"] == got["edit1"]["sha256"]
    assert got["load"]["sha256"] == got["undo"]["sha256"]
    lock = json.loads(LOCK.read_text()) if LOCK.exists() else {"cases": {}, "hashes": {}}
    case, key = f"{method}/{engine}", machine_key()
    if os.environ.get("ENCORE_FAST_RECORD_LOCK") == "1":
        lock["cases"].setdefault(case, {k: v["edit"] for k, v in got.items()})
        lock["hashes"].setdefault(key, {})[case] = {k: v["sha256"] for k, v in got.items()}
        LOCK.parent.mkdir(exist_ok=True)
        LOCK.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n")
        return
    assert case in lock["cases"], f"{case} was never recorded"
    for stage, want in lock["cases"][case].items():
        for layer, rec in want.items():
            now = got[stage]["edit"][layer]
            scale = max(rec["norm"], 1e-12)
            assert abs(now["norm"] - rec["norm"]) <= 1e-4 * scale, (stage, layer)
            worst = max(abs(a - b) for a, b in zip(now["proj"], rec["proj"], strict=True))
            assert worst <= 1e-4 * scale, (stage, layer, worst)
    exact = lock["hashes"].get(key, {}).get(case)
    if exact is None:
        pytest.skip(f"exact hashes not recorded on {key} (projections matched)")
    assert {k: v["sha256"] for k, v in got.items()} == exact


# --- files written before the refactor --------------------------------------------------------

def legacy_stream() -> list[EvalRecord]:
    return [EvalRecord(r, "counterfact", [f"In short, {r.prompt}"], ["The capital of Italy is"],
                       "Paris", index=i) for i, r in enumerate(requests(0, 6))]


def legacy_editor(model, tokenizer, **kw) -> Editor:
    return Editor(model, tokenizer, "encore", preset=None, engine="fast", corpus=CORPUS,
                  stats_cache=False, progress=False, **{**SETTINGS, **kw})


@pytest.mark.parametrize("name,batches,kept", [("edits-full", 3, 3), ("edits-compact", 3, 0)])
def test_edits_files_written_before_still_load(name, batches, kept, tiny_models, tokenizer,
                                               one_thread):
    path = LEGACY / f"{name}.safetensors"
    want = json.loads((LEGACY / f"{name}.json").read_text())
    ed = legacy_editor(copy.deepcopy(tiny_models["llama"]), tokenizer,
                       history=None if kept else 0)
    assert ed.load_edits(path) == batches
    assert ed.num_edits == want["num_edits"]
    w0 = {l: w.float() for l, w in ed._original.items()}  # noqa: SLF001 (the test's own view)
    got = projections(edited(ed), w0)
    for layer, rec in want["edit"].items():
        scale = max(rec["norm"], 1e-12)
        assert abs(got[layer]["norm"] - rec["norm"]) <= 1e-5 * scale
    if kept:
        ed.undo()
        assert ed.num_batches == batches - 1
    before = ed.num_batches
    ed.edit(requests(4, 2))  # and it goes on
    assert ed.num_batches == before + 1


def test_run_folder_written_before_still_reads_and_resumes(tiny_models, tokenizer, tmp_path,
                                                         one_thread):
    import shutil

    from encore_fast.eval.report import load_run, summarize_run
    from encore_fast.eval.run import EvalSettings, read_results, run_sequential

    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    data = load_run(run)
    assert [e["edits_done"] for e in data.evals] == [0, 2]
    summary = summarize_run(data)
    assert summary["es"] == data.evals[-1]["metrics"]["es"]
    model = copy.deepcopy(tiny_models["llama"])
    run_sequential(lambda: legacy_editor(model, tokenizer), legacy_stream(), run,
                   num_edits=4, batch_size=2, eval_every=1, settings=EvalSettings(),
                   resume=True, progress=False, make_plots=False)
    lines = read_results(run / "results.jsonl")
    assert [x["batch"] for x in lines if x["type"] == "batch"] == [0, 1]
    assert [x["edits_done"] for x in lines if x["type"] == "eval"] == [0, 2, 4]
