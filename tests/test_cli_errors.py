"""The console command never shows a traceback for a user mistake: one line on stderr naming the
problem, exit status 2, and nothing written."""

from __future__ import annotations

import argparse
import json

import pytest

from encore_fast.cli import build_parser, main
from encore_fast.config import parse_overrides
from encore_fast.errors import ConfigError, RequestError
from encore_fast.requests import read_requests_file

GOOD = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}


def _fails(capsys, argv, *words) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    # (a model that was loaded may have drawn its progress bar there first)
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def reqs(tmp_path):
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps([GOOD]))
    return path


@pytest.mark.parametrize("content,suffix,words", [
    ("[]", ".json", ["holds no requests"]),
    ("\n\n  \n", ".jsonl", ["holds no requests"]),
    (json.dumps(GOOD) + "\n\n{bad json\n", ".jsonl", ["line 3", "not valid JSON"]),
    (json.dumps([GOOD, {"prompt": "x {}", "subject": "y"}]), ".json",
     ["record #1", "target_new"]),
    (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "subject": None}) + "\n", ".jsonl",
     ["line 2", "must be a string"]),
    (json.dumps([{**GOOD, "prompt": "Parisians are", "subject": "Paris"}]), ".json",
     ["inside a longer word"]),
])
def test_bad_request_files(tmp_path, capsys, content, suffix, words):
    path = tmp_path / f"reqs{suffix}"
    path.write_text(content)
    out = tmp_path / "edits.safetensors"
    # --model does not exist: the requests are refused before any model is loaded
    line = _fails(capsys, ["edit", str(path), "--out", str(out), "--model",
                           str(tmp_path / "nomodel")], *words)
    assert "longer word" in line or str(path) in line
    assert not out.exists()


@pytest.mark.parametrize("setting,words", [
    (["--set", "lambda_q=1"], ["unknown setting", "lambda_q"]),
    (["--set", "batch_size=0"], ["batch_size must be an integer >= 1"]),
    (["--set", "layers=4"], ["layers must be a non-empty list"]),
    (["--set", "layers=[5,4]"], ["ascending"]),
    (["--set", "noequals"], ["KEY=VALUE"]),
    (["--preset", "gpt9"], ["unknown preset", "gpt9"]),
])
def test_bad_settings_before_loading(reqs, tmp_path, capsys, setting, words):
    out = tmp_path / "edits.safetensors"
    # --model does not exist: the settings must be refused before any model is loaded
    _fails(capsys, ["edit", str(reqs), "--out", str(out), "--model", str(tmp_path / "nomodel"),
                    *setting], *words)
    assert not out.exists()


def test_layers_beyond_the_model_and_missing_model(tiny_dir, reqs, tmp_path, capsys):
    out = tmp_path / "edits.safetensors"
    _fails(capsys, ["edit", str(reqs), "--out", str(out), "--model", str(tiny_dir),
                    "--set", "layers=[4,9]"], "do not exist", "6 layers")
    assert not out.exists()
    _fails(capsys, ["edit", str(reqs), "--out", str(out), "--model", str(tmp_path / "nomodel"),
                    "--set", "layers=[2,3]"])
    assert not out.exists()


def test_existing_output_is_not_overwritten(reqs, tmp_path, capsys):
    out = tmp_path / "edits.safetensors"
    out.write_bytes(b"precious")
    _fails(capsys, ["edit", str(reqs), "--out", str(out)], "exists", "--overwrite")
    assert out.read_bytes() == b"precious"


def test_eval_mistakes_write_no_run_folder(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    base = ["eval", "--out", str(out), "--model", str(tmp_path / "nomodel"),
            "--dataset", str(data_dir / "counterfact" / "counterfact-train.json")]
    _fails(capsys, [*base, "--set", "lambda_p=-1"], "lambda_p")
    _fails(capsys, [*base, "--dataset", str(tmp_path / "missing.json")])
    _fails(capsys, [*base, "--corpus", str(tmp_path / "missing.txt")], "missing.txt")
    assert not out.exists()
    with pytest.raises(SystemExit) as info:  # argparse: usage line + exit 2, no traceback
        main([*base, "--batch-size", "0"])
    assert info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_every_option_has_help_and_methods_come_from_the_registry():
    from encore_fast.methods import RULES

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
        method = next(a for a in sub._actions if a.dest == "method")
        assert sorted(method.choices) == sorted(RULES), name
    args = parser.parse_args(["eval", "--method", "memit-seq"])
    assert args.method == "memit-seq"


def test_read_requests_file_and_parse_overrides(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "case_id": 3}) + "\n")
    got = read_requests_file(path)
    assert [r.case_id for r in got] == [None, 3] and got[0].subject == "France"
    path.write_text(json.dumps(GOOD) + "\n\n\n" + "[1, 2\n")
    with pytest.raises(RequestError, match="line 4"):
        read_requests_file(path)
    assert parse_overrides(["layers=[4,5]", "lambda_p=150", "name=text"]) == {
        "layers": [4, 5], "lambda_p": 150, "name": "text"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["=3"])
