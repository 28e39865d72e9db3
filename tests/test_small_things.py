"""What a user meets first: one request given alone, a wrong type named, the edit report's
shape, plain-text help, and the temporary file a killed save leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from encore_fast.io import atomic_write_text, clear_stale_temporaries
from encore_fast.requests import RequestError, as_requests

ONE = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}


def test_one_request_or_dict_alone_is_a_list_of_one():
    (req,) = as_requests(ONE)
    assert req.subject == "France" and as_requests(req) == [req]
    assert as_requests([ONE, req]) == [req, req]


@pytest.mark.parametrize("bad,named", [
    ("The capital of France is Rome", "str"),
    (42, "int"),
    ([ONE, "Rome"], "request #1 is a str"),
    ([ONE, None], "request #1 is a NoneType"),
])
def test_other_types_are_refused_by_name(bad, named):
    with pytest.raises(RequestError, match=named):
        as_requests(bad)


def test_editor_takes_one_dict(tiny_models, tokenizer):
    import copy

    from helpers import small_editor

    corpus = ["The river runs past the old mill and into the valley below the town."] * 8
    ed = small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus)
    w0 = ed.edited_weight(ed.hparams.layers[0]).clone()
    (report,) = ed.edit(ONE)
    assert report.n_requests == 1 and ed.num_edits == 1
    assert not torch.equal(ed.edited_weight(ed.hparams.layers[0]), w0)
    with pytest.raises(RequestError, match="str"):
        ed.edit("France -> Rome")
    assert ed.num_edits == 1


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, "-m", "encore_fast", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "encore-fast" in out and "``" not in out and ":class:" not in out


def test_a_killed_saves_temporary_file_is_cleared_by_the_next_save(tmp_path):
    target = tmp_path / "edits.json"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that has exited: its writer is gone
    stale = tmp_path / f".edits.json.tmp{gone.pid}"
    stale.write_text("half")
    live = tmp_path / f".edits.json.tmp{os.getppid()}"  # a running process's: left alone
    live.write_text("busy")
    other = tmp_path / f".other.json.tmp{gone.pid}"  # another target's: not this save's
    other.write_text("x")
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    assert not stale.exists() and live.exists() and other.exists()
    assert clear_stale_temporaries(tmp_path / "other.json") == [other]


def test_eval_says_when_the_stream_is_shorter_than_num_edits(tmp_path, monkeypatch, capsys):
    import argparse
    import json

    from encore_fast.eval import cli as eval_cli
    from encore_fast.eval.testing import FakeEditor

    data = tmp_path / "six.json"
    data.write_text(json.dumps([
        {"case_id": i, "prompt": f"x{i} lives in", "subject": f"x{i}", "target_new": "y",
         "ground_truth": "z", "rephrase_prompt": f"where x{i} lives",
         "locality_prompt": "x lives in", "locality_ground_truth": "z"} for i in range(6)]))
    monkeypatch.setattr(eval_cli, "editor_factory", lambda args, method, overrides: FakeEditor)
    parser = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(parser)

    def run(n):
        out = tmp_path / f"r{n}"
        args = parser.parse_args(["--dataset", str(data), "--num-edits", str(n), "--batch-size",
                                  "3", "--wikitext", "none", "--known-facts", "none", "--out",
                                  str(out), "--quiet", "--no-plots"])
        assert eval_cli.run_eval(args) == 0
        return capsys.readouterr().err

    assert "--num-edits 1000, but" in run(1000) and "editing 6" in run(1000 + 1)
    assert "--num-edits" not in run(6)


def test_the_demo_takes_wikitext_from_the_data_and_goes_on_without_it(monkeypatch, capsys):
    from encore_fast import cli
    from encore_fast.data import DataError

    monkeypatch.setattr(cli, "locate", lambda name, **kw: f"/data/{name}")
    assert cli.demo_corpus() == "/data/wikitext-2-valid"

    def offline(name, **kw):
        raise DataError("cannot download wikitext-2/valid.txt (offline)")

    monkeypatch.setattr(cli, "locate", offline)
    assert cli.demo_corpus() is None
    assert "no WikiText-2: cannot download" in capsys.readouterr().err


def test_a_named_preset_for_long_streams_on_smollm2():
    from encore_fast.config import PRESETS, guess_preset, make_config

    few, many = (make_config("encore", p, 30) for p in ("smollm2-135m", "smollm2-135m-stream"))
    assert (few.lambda_p, few.lambda_n) == (150.0, 2.0)
    assert (many.lambda_p, many.lambda_n, many.mpes_extra_steps) == (5000.0, 20.0, 2)
    assert make_config("memit-seq", "smollm2-135m-stream", 30).lambda_p == 5000.0
    assert guess_preset("HuggingFaceTB/SmolLM2-135M") == "smollm2-135m"  # (a few edits)
    assert set(PRESETS["smollm2-135m-stream"]) == set(PRESETS["smollm2-135m"])
