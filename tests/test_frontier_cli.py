"""The new methods from the command line: ``encore-fast edit --method evoedit / ultraedit`` save
edits that an editor of the same method loads, and ``encore-fast eval --method alphaedit+nas``
runs a real (tiny) stream with its namespaced settings stored in the run's config."""

from __future__ import annotations

import json

import pytest
import torch

from encore_fast.cli import main
from encore_fast.editor import Editor

SMALL = ["--set", "layers=[2,3]", "--set", "v_num_grad_steps=3", "--set", "stats_samples=8",
         "--set", "stats_max_length=32"]


@pytest.fixture
def requests_file(tmp_path, data_dir):
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())[:4]
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(("method", "settings", "site"), [
    ("evoedit", [*SMALL, "--set", "alpha=1.0"], 3),
    ("ultraedit", ["--set", "gate_layers=[1]", "--set", "up_layers=[2]", "--set", "lr=0.01"],
     "mlp_up.2"),
    ("rect", [*SMALL, "--set", "rect.keep=0.3"], 3),
])
def test_edit_command_with_a_new_method(tiny_dir, requests_file, tmp_path, data_dir, capsys,
                                        method, settings, site):
    out = tmp_path / "edits.safetensors"
    corpus = str(data_dir / "wikitext-2" / "valid.txt")
    code = main(["edit", str(requests_file), "--model", str(tiny_dir), "--out", str(out),
                 "--method", method, "--corpus", corpus, "--batch-size", "2", *settings])
    assert code == 0 and out.exists()
    assert "4 edits in 2 batch(es)" in capsys.readouterr().out
    overrides = dict(s.split("=", 1) for s in settings[1::2])
    ed = Editor.from_pretrained(str(tiny_dir), method, preset=None, progress=False,
                                corpus=corpus, **{k: json.loads(v) for k, v in overrides.items()})
    w0 = ed.view.weight(site).detach().clone()
    assert ed.load_edits(out) == 2
    assert not torch.equal(ed.view.weight(site), w0)


def test_eval_command_with_a_composition(tiny_dir, tmp_path, data_dir, capsys):
    records = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[:4]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    code = main(["eval", "--method", "alphaedit+nas", "--model", str(tiny_dir), *SMALL,
                 "--set", "nas.anchor=1.5", "--set", "alpha=1.0", "--dataset", str(data),
                 "--corpus", str(data_dir / "wikitext-2" / "valid.txt"), "--num-edits", "4",
                 "--batch-size", "2", "--eval-every", "1", "--wikitext", "none",
                 "--known-facts", "none", "--downstream", "none", "--out", str(out),
                 "--quiet", "--no-plots"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "alphaedit+nas"
    assert config["hparams"]["method_settings"]["nas"]["anchor"] == 1.5
    evals = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert [e["edits_done"] for e in evals] == [0, 2, 4]
