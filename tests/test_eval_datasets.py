"""Data-set loaders: both CounterFact layouts, zsRE, JSON lines, malformed records, offline."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from helpers import need_data

from encore_fast.eval.datasets import (
    DatasetError,
    default_data_dir,
    detect_layout,
    load_dataset,
)

EASYEDIT = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
ROME = {
    "case_id": 3,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["p1 Danielle Darrieux speaks", "p2 Danielle Darrieux writes"],
    "neighborhood_prompts": ["n1 is a native speaker of", "n2 speaks"],
    "attribute_prompts": ["a1"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is", "g2"],
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: who plays walter in the big lebowski",
    "loc_ans": "John Goodman",
}


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def test_easyedit_counterfact(tmp_path):
    (rec,) = load_dataset(write(tmp_path, [EASYEDIT]))
    assert rec.kind == "counterfact"
    assert rec.request.text == EASYEDIT["prompt"]
    assert rec.request.template == "The mother tongue of {} is"
    assert (rec.request.target_new, rec.request.ground_truth) == ("English", "French")
    assert rec.request.case_id == 7
    assert rec.paraphrase_prompts == [EASYEDIT["rephrase_prompt"]]
    assert rec.neighborhood_prompts == [EASYEDIT["locality_prompt"]]
    assert rec.neighborhood_answer == "French"
    assert rec.generation_prompts == []


def test_rome_counterfact_jsonl(tmp_path):
    (rec,) = load_dataset(write(tmp_path, [ROME], "cf.jsonl"))
    assert rec.kind == "counterfact"
    assert rec.request.text == "The mother tongue of Danielle Darrieux is"
    assert (rec.request.target_new, rec.request.ground_truth) == ("English", "French")
    assert rec.request.case_id == 3
    assert rec.paraphrase_prompts == ROME["paraphrase_prompts"]
    assert rec.neighborhood_prompts == ROME["neighborhood_prompts"]
    assert rec.neighborhood_answer == "French"
    assert rec.generation_prompts == ROME["generation_prompts"]


def test_zsre(tmp_path):
    (rec,) = load_dataset(write(tmp_path, [ZSRE]))
    assert rec.kind == "zsre"
    assert rec.request.text == ZSRE["src"]
    assert rec.request.target_new == "unmanned aircraft"
    assert rec.request.ground_truth == "uniform"  # answers[0]
    assert rec.paraphrase_prompts == [ZSRE["rephrase"]]
    assert rec.neighborhood_prompts == [ZSRE["loc"] + "?"]
    assert rec.neighborhood_answer == "John Goodman"


def test_layout_detection():
    assert detect_layout([EASYEDIT]) == "counterfact-easyedit"
    assert detect_layout([ROME]) == "counterfact-rome"
    assert detect_layout([ZSRE]) == "zsre"
    with pytest.raises(DatasetError, match="layout"):
        detect_layout([{"question": "?"}])


def bad_stream():
    no_target = {k: v for k, v in EASYEDIT.items() if k != "target_new"}
    wrong_subject = dict(EASYEDIT, subject="Nobody")
    empty_truth = dict(EASYEDIT, ground_truth="  ")
    return [EASYEDIT, no_target, EASYEDIT, wrong_subject, "text", empty_truth]


def test_malformed_records_are_listed_by_index(tmp_path):
    path = write(tmp_path, bad_stream())
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    msg = str(info.value)
    assert "[1, 3, 4, 5]" in msg
    assert "target_new" in msg and "Nobody" in msg and "ground_truth" in msg


def test_malformed_records_warn_and_skip(tmp_path):
    path = write(tmp_path, bad_stream())
    with pytest.warns(UserWarning, match=r"\[1, 3, 4, 5\]"):
        records = load_dataset(path, on_error="warn")
    assert [r.index for r in records] == [0, 2]


def test_bad_zsre_and_rome_records(tmp_path):
    zsre_bad = dict(ZSRE, answers=[])
    with pytest.raises(DatasetError, match=r"\[1\].*answers"):
        load_dataset(write(tmp_path, [ZSRE, zsre_bad]))
    rome_bad = dict(ROME, paraphrase_prompts=[3])
    with pytest.raises(DatasetError, match=r"\[1\].*paraphrase"):
        load_dataset(write(tmp_path, [ROME, rome_bad], "r.json"))


def test_broken_json_lines_name_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(EASYEDIT) + "\n{not json\n")
    with pytest.raises(DatasetError, match="line 2"):
        load_dataset(path)


def test_missing_file_and_offline_url(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_FAST_CACHE", str(tmp_path / "cache"))  # (no cached copy helps)
    with pytest.raises(DatasetError, match="no data set file"):
        load_dataset(tmp_path / "nope.json")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="local path"):
        load_dataset("counterfact")
    with pytest.raises(DatasetError, match="could not download https://example.org/cf.json"):
        load_dataset("https://example.org/cf.json")


def test_default_data_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_FAST_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path


def test_limit_keeps_the_first_records(tmp_path):
    path = write(tmp_path, [EASYEDIT, dict(EASYEDIT, case_id=8), {"broken": True}])
    assert [r.request.case_id for r in load_dataset(path, limit=2)] == [7, 8]


def test_shared_data_loads():
    base = default_data_dir()
    if base is None or not (base / "zsre").exists():
        need_data("zsre")
    cf = load_dataset(base / "counterfact" / "counterfact-edit.json")
    assert len(cf) == 10_000
    assert all(r.kind == "counterfact" and r.neighborhood_prompts for r in cf[:100])
    zsre = base / "zsre" / "zsre_mend_train-1k.json"
    with pytest.raises(DatasetError, match=r"\[534, 723\].*alt"):  # two records have alt ""
        load_dataset(zsre)
    with pytest.warns(UserWarning, match="534"):
        zs = load_dataset(zsre, on_error="warn")
    assert len(zs) == 998 and zs[0].kind == "zsre"
