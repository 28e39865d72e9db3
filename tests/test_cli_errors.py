"""The console command never shows a traceback for a user mistake: one line on stderr naming the
problem, exit status 2, and nothing written."""

from __future__ import annotations

import argparse
import json

import pytest

from encore_fast.cli import build_parser, check_out_after_edits, main
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
    folder = tmp_path / "folder"
    folder.mkdir()
    _fails(capsys, ["edit", str(reqs), "--out", str(folder), "--overwrite"], "a folder")
    assert not any(folder.iterdir())
    _fails(capsys, ["edit", str(reqs), "--out", str(reqs / "edits.safetensors")],
           "not a folder")


class _Rank:
    """A stand-in for a process group's rank: records what it was told to agree on."""

    def __init__(self, is_main: bool) -> None:
        self.is_main, self.agreed = is_main, []

    def agree(self, error, what) -> None:
        self.agreed.append((error, what))


def test_out_is_checked_after_the_edits_by_rank_0_alone(tmp_path):
    # Rank 0 writes --out and may already have written it when a slower rank looks again:
    # only rank 0's view counts, and every rank learns it through agree().
    out = tmp_path / "edits.safetensors"
    out.write_bytes(b"saved by rank 0")
    other = _Rank(is_main=False)
    check_out_after_edits(str(out), False, other)
    assert other.agreed == [(None, f"checking --out {out}")]
    main_rank = _Rank(is_main=True)
    check_out_after_edits(str(out), False, main_rank)
    (error, _), = main_rank.agreed
    assert isinstance(error, ConfigError) and "--overwrite" in str(error)
    with pytest.raises(ConfigError, match="exists"):
        check_out_after_edits(str(out), False, None)


@pytest.mark.parametrize("make,words", [
    (lambda tmp: str(tmp / "no" / "such" / "model"), ["--model", "no such folder"]),
    (lambda tmp: "./no/such/model", ["--model", "no such folder"]),
    (lambda tmp: (tmp / "empty").mkdir() or str(tmp / "empty"), ["no config.json"]),
    (lambda tmp: (tmp / "f.bin").write_bytes(b"x") and str(tmp / "f.bin"),
     ["a file, not a model folder"]),
])
def test_bad_model_paths_before_loading(reqs, tmp_path, capsys, make, words):
    out = tmp_path / "edits.safetensors"
    _fails(capsys, ["edit", str(reqs), "--out", str(out), "--model", make(tmp_path)], *words)
    assert not out.exists()


@pytest.mark.parametrize("make,words", [
    (lambda tmp: str(tmp / "missing.txt"), ["--corpus", "missing.txt", "no such file"]),
    (lambda tmp: "./no/such/corpus", ["no such file"]),
    (lambda tmp: (tmp / "c.jsonl").write_text('{"text": 1}\n') and str(tmp / "c.jsonl"),
     ["--corpus", "cannot read texts"]),
    (lambda tmp: (tmp / "c.json").write_text('[{"txt": "a"}]') and str(tmp / "c.json"),
     ["--corpus", "cannot read texts", "KeyError"]),
    (lambda tmp: (tmp / "c.txt").write_text("\n\n") and str(tmp / "c.txt"),
     ["--corpus", "no usable text"]),
])
def test_bad_corpus_before_loading(reqs, tmp_path, capsys, make, words):
    out = tmp_path / "edits.safetensors"
    _fails(capsys, ["edit", str(reqs), "--out", str(out), "--model", str(tmp_path / "nomodel"),
                    "--corpus", make(tmp_path)], *words)
    assert not out.exists()


def test_batches_of_the_preset_are_checked_before_loading(tmp_path, capsys):
    path = tmp_path / "twice.json"
    path.write_text(json.dumps([GOOD, GOOD]))
    base = ["edit", str(path), "--out", str(tmp_path / "e.safetensors"),
            "--model", str(tmp_path / "nomodel")]
    _fails(capsys, base, "request #1", "repeats request #0")
    # in batches of one the repeat is allowed: the next mistake found is the missing model
    _fails(capsys, [*base, "--batch-size", "1"], "no such folder")
    _fails(capsys, [*base, "--set", "batch_size=1"], "no such folder")


def test_eval_mistakes_write_no_run_folder(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    base = ["eval", "--out", str(out), "--model", str(tmp_path / "nomodel"),
            "--dataset", str(data_dir / "counterfact" / "counterfact-train.json")]
    _fails(capsys, [*base, "--set", "lambda_p=-1"], "lambda_p")
    _fails(capsys, [*base, "--dataset", str(tmp_path / "missing.json")])
    _fails(capsys, [*base, "--corpus", str(tmp_path / "missing.txt")], "missing.txt")
    assert not out.exists()
    _fails(capsys, [*base, "--wikitext", str(tmp_path / "missing.txt")], "--wikitext",
           "no such file")
    _fails(capsys, [*base, "--known-facts", str(tmp_path / "missing.json")], "--known-facts",
           "no such file")
    bad = tmp_path / "known.json"
    bad.write_text("[1, 2")
    _fails(capsys, [*base, "--known-facts", str(bad)], "known facts", "known.json")
    bad.write_text(json.dumps([{"prompt": "x"}]))
    _fails(capsys, [*base, "--known-facts", str(bad)], "lack a non-empty")
    _fails(capsys, [*base, "--ppl-tokens", "100", "--ppl-window", "200"], "--ppl-tokens")
    _fails(capsys, [*base, "--dataset", str(bad)], "known.json")  # not an edit data set
    stream = tmp_path / "stream.json"
    stream.write_text(json.dumps([{**GOOD, "case_id": 0, "prompt": "Paris is",
                                   "ground_truth": "Paris"}]))
    _fails(capsys, [*base, "--dataset", str(stream), "--layout", "counterfact-easyedit"],
           "case 0", "not in the prompt")  # the stream's requests, checked before loading
    _fails(capsys, [*base, "--preset", "gpt9"], "unknown preset")
    _fails(capsys, [*base, "--corpus", "./no/such/corpus"], "--corpus")
    _fails(capsys, [*base[:4], str(tmp_path / "no" / "such" / "model"), *base[5:]],
           "no such folder")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    _fails(capsys, [*base[:2], str(tmp_path / "file"), *base[3:]], "not a run folder")
    for option in ("--batch-size", "--num-edits", "--ppl-tokens", "--ppl-window",
                   "--score-batch-size"):
        with pytest.raises(SystemExit) as info:  # argparse: usage line + exit 2, no traceback
            main([*base, option, "0"])
        assert info.value.code == 2
        assert "must be >= 1" in capsys.readouterr().err
    for option in ("--eval-every", "--eval-sample", "--known-n", "--gen-tokens"):
        with pytest.raises(SystemExit) as info:
            main([*base, option, "-1"])
        assert info.value.code == 2
        assert "must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--num-edits", "ten"])
    assert "expected an integer" in capsys.readouterr().err
    assert not out.exists()


def test_eval_refuses_a_folder_holding_a_run_unless_resumed(tiny_dir, tmp_path, capsys,
                                                             data_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    _fails(capsys, ["eval", "--out", str(out), "--model", str(tiny_dir), "--set", "layers=[2,3]",
                    "--dataset", str(data_dir / "counterfact" / "counterfact-train.json")],
           "already holds a run", "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize("extra,words", [
    (["--set", "lambda_q=1"], ["encore-fast demo: error:", "unknown setting"]),
    (["--set", "layers=[3,2]"], ["ascending"]),
    (["--model", "./no/such/model"], ["no such folder"]),
])
def test_demo_mistakes(capsys, extra, words):
    _fails(capsys, ["demo", *extra], *words)


def test_eval_text_too_short_for_a_window_writes_no_run_folder(tiny_dir, tmp_path, capsys,
                                                               data_dir):
    out = tmp_path / "run"
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    _fails(capsys, ["eval", "--out", str(out), "--model", str(tiny_dir), "--set", "layers=[2,3]",
                    "--dataset", str(data_dir / "counterfact" / "counterfact-train.json"),
                    "--wikitext", str(short), "--known-facts", "none", "--quiet"],
           "--wikitext", "fewer than one window")
    assert not out.exists()


def test_every_option_has_help_and_methods_come_from_the_registry():
    from encore_fast.editor import ENGINES
    from encore_fast.methods import ALIASES, RULES

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
        if name == "data":  # (lists and downloads data sets: no model, engine or method)
            continue
        engine = next(a for a in sub._actions if a.dest == "engine")
        assert sorted(engine.choices) == sorted(ENGINES), name
        if name == "eval-snapshots":  # evaluates a run folder: its method is the run's
            continue
        method = next(a for a in sub._actions if a.dest == "method")
        assert sorted(method.choices) == sorted([*RULES, *ALIASES]), name
        assert "alphaedit+nas" in method.choices and "nas+alphaedit" in method.choices
        assert "nas+rect+nas" not in method.choices and "encore+memit" not in method.choices
    assert "memit-seq" in RULES
    args = parser.parse_args(["eval", "--method", "memit-seq"])
    assert args.method == "memit-seq"
    args = parser.parse_args(["edit", "r.json", "--method", "memit-seq"])
    assert args.method == "memit-seq"


def test_read_requests_file_and_parse_overrides(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "case_id": 3}) + "\n")
    got = read_requests_file(path)
    assert [r.case_id for r in got] == [None, 3] and got[0].subject == "France"
    path.write_text(json.dumps(GOOD) + "\n\n\n" + "[1, 2\n")
    with pytest.raises(RequestError, match="line 4"):
        read_requests_file(path)
    # line numbers count the file's newlines only (a JSON string may hold U+2028)
    path.write_text(json.dumps({**GOOD, "prompt": "The capital\u2028of {} is"},
                               ensure_ascii=False) + "\n\n{bad\n")
    with pytest.raises(RequestError, match=r"r\.jsonl line 3: not valid JSON"):
        read_requests_file(path)
    path.write_text("\n" + json.dumps(GOOD) + "\n" + json.dumps(["not", "an object"]) + "\n")
    with pytest.raises(RequestError, match="line 3: expected an object"):
        read_requests_file(path)
    path.write_text(json.dumps({"requested_rewrite": "text"}) + "\n")
    with pytest.raises(RequestError, match="line 1: requested_rewrite must be an object"):
        read_requests_file(path)
    # a .json (or any) file of JSON lines is read as JSON lines; one JSON object is one request
    other = tmp_path / "r.json"
    other.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "case_id": 7}) + "\n")
    assert [r.case_id for r in read_requests_file(other)] == [None, 7]
    other.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "subject": 5}) + "\n")
    with pytest.raises(RequestError, match="line 2.*must be a string"):
        read_requests_file(other)
    other.write_text(json.dumps({**GOOD, "case_id": 1}, indent=2))
    assert [r.case_id for r in read_requests_file(other)] == [1]
    other.write_text("\ufeff" + json.dumps([GOOD, {**GOOD, "target_new": None}]))
    with pytest.raises(RequestError, match=r"r\.json record #1: .*missing field"):
        read_requests_file(other)
    # a damaged JSON list is reported as one document (with the position), not as lines
    other.write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]")
    with pytest.raises(RequestError, match=r"r\.json: not valid JSON .*line 3"):
        read_requests_file(other)
    with pytest.raises(RequestError, match="cannot read requests"):
        read_requests_file(tmp_path / "missing.json")
    with pytest.raises(RequestError, match="cannot read requests"):
        read_requests_file(tmp_path)
    assert parse_overrides(["layers=[4,5]", "lambda_p=150", "name=text"]) == {
        "layers": [4, 5], "lambda_p": 150, "name": "text"}
    assert parse_overrides([" batch_size = 4", "flag=true", "x=", "w=a=b", "n=null"]) == {
        "batch_size": 4, "flag": True, "x": "", "w": "a=b", "n": None}
    assert parse_overrides([]) == {}
    for bad in (["=3"], ["noequals"], ["  =1"]):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_overrides(bad)
    import encore_fast.eval.cli as eval_cli

    assert eval_cli.parse_overrides is parse_overrides  # one parser, importable from both
