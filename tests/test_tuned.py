"""Each method's settings on SmolLM2-135M, read from the tuning's summary (benchmarks/tuned.py),
and the speed benchmark's ``--tuned``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

from encore_fast.errors import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def tuned(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (the benchmarks import each other)
    yield load_benchmark("tuned")
    for name in ("tuned", "bench_methods", "bench_engines", "compare_methods", "csv_rows",
                 "value_flops"):
        sys.modules.pop(name, None)


def summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({
        "chosen": {"emmet": "emmet-d", "evoedit": None, "alphaedit+nas": "nas-b"},
        "rows": [{"name": "emmet-a", "method": "emmet", "settings": "lambda_p=1"},
                 {"name": "emmet-d", "method": "emmet", "settings": "lambda_p=5000 "
                                                                    "emmet.lambda_e=1.0"},
                 {"name": "nas-b", "method": "alphaedit+nas", "settings": "alpha=10.0"}]}))
    return path


def test_the_chosen_candidate_any_name_and_the_study_settings(tuned, tmp_path):
    path = summary(tmp_path)
    assert tuned.tuned("emmet", path) == ("lambda_p=5000 emmet.lambda_e=1.0", "emmet-d")
    assert tuned.tuned("nas", path) == ("alpha=10.0", "nas-b")  # (alphaedit+nas's alias)
    assert tuned.set_args("emmet", path) == ["--set", "lambda_p=5000", "--set",
                                             "emmet.lambda_e=1.0"]
    assert tuned.tuned("encore", path) == ("lambda_p=5000 lambda_n=20", "study")
    assert tuned.set_args("alphaedit", path) == []
    with pytest.raises(tuned.NotTuned, match="evoedit: not tuned yet"):
        tuned.tuned("evoedit", path)
    with pytest.raises(tuned.NotTuned, match="rlsedit: not among the tuned"):
        tuned.tuned("rlsedit", path)
    with pytest.raises(ConfigError, match="unknown method 'bogus'"):
        tuned.tuned("bogus", path)
    assert tuned.main(["evoedit"]) == 0 and tuned.main([]) == 2  # (the committed summary)
    assert tuned.main(["bogus"]) == 1


def test_committed_choices_are_rows_of_their_method(tuned):
    data = json.loads(tuned.SUMMARY.read_text())
    for method, name in data["chosen"].items():
        if name is not None:
            row = next(r for r in data["rows"] if r["name"] == name)
            assert row["method"] == method and tuned.tuned(method)[1] == name


def test_bench_methods_tuned_settings_under_explicit_ones(tuned, monkeypatch):
    bm = load_benchmark("bench_methods")
    settings = {"emmet": "lambda_p=5000 emmet.lambda_e=1.0", "encore": "lambda_p=5000"}

    def fake(method):
        if method not in settings:
            raise tuned.NotTuned(f"{method}: not tuned yet")
        return settings[method], "x"
    monkeypatch.setattr(bm, "tuned", fake)
    monkeypatch.setattr(bm, "NotTuned", tuned.NotTuned)
    _, methods, over = bm.parse_args(["--methods", "encore,emmet,evoedit", "--tuned",
                                      "--set", "emmet:lambda_p=7"])
    assert over["emmet"] == {"lambda_p": 7, "emmet.lambda_e": 1.0}
    assert over["encore"] == {"lambda_p": 5000} and over["evoedit"] == {}
    _, _, plain = bm.parse_args(["--methods", "encore,emmet"])
    assert plain == {}


def test_the_stream_preset_gives_each_tuned_method_its_choice(tuned):
    """A user's ``preset="smollm2-135m-stream"`` edits with what the tuning chose: the same
    settings as the tuning's preset plus the chosen candidate's."""
    from encore_fast.config import make_config, method_parts, parse_overrides
    from encore_fast.methods import RULES

    data = json.loads(tuned.SUMMARY.read_text())
    checked = 0
    for method, name in data["chosen"].items():
        if name is None:
            continue
        words = tuned.tuned(method)[0].split()
        want = make_config(method, "smollm2-135m", 30, **parse_overrides(words))
        got = make_config(method, "smollm2-135m-stream", 30)
        if not RULES[method_parts(method)[0]].uses_c0:  # (λ_p, λ_n: unused without C0)
            got = got.replace(lambda_p=want.lambda_p, lambda_n=want.lambda_n)
        assert got == want, method
        checked += 1
    assert checked >= 2
    # UltraEdit's SmolLM2 depths hold for both SmolLM2 presets
    stream, short = (make_config("ultraedit", p, 30).method_settings["ultraedit"]
                     for p in ("smollm2-135m-stream", "smollm2-135m"))
    assert [stream[k] for k in ("gate_layers", "up_layers")] == \
        [short[k] for k in ("gate_layers", "up_layers")]
