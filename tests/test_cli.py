"""The console command: `edit` applies a requests file to a model from a path and saves edits."""

from __future__ import annotations

import json

import torch

from encore_fast.cli import main
from encore_fast.editor import Editor


def test_edit_command_saves_loadable_edits(tiny_dir, tmp_path, data_dir, capsys):
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())[:3]
    req_file = tmp_path / "reqs.jsonl"
    req_file.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "edits.safetensors"
    settings = ["--set", "layers=[2,3]", "--set", "v_num_grad_steps=3", "--set",
                "stats_samples=8", "--set", "stats_max_length=32"]
    code = main(["edit", str(req_file), "--model", str(tiny_dir), "--out", str(out),
                 "--corpus", str(data_dir / "wikitext-2" / "valid.txt"), *settings])
    assert code == 0 and out.exists()
    assert "3 edits in 1 batch" in capsys.readouterr().out

    ed = Editor.from_pretrained(str(tiny_dir), "encore", preset=None, layers=[2, 3],
                                stats_samples=8, stats_max_length=32, progress=False,
                                corpus=data_dir / "wikitext-2" / "valid.txt")
    w0 = ed.view.weight(3).detach().clone()
    assert ed.load_edits(out) == 1
    assert [r.case_id for r in ed.requests] == [r["case_id"] for r in records]
    assert not torch.equal(ed.view.weight(3), w0)


def test_edit_command_reports_bad_requests(tiny_dir, tmp_path, capsys):
    req_file = tmp_path / "bad.json"
    req_file.write_text(json.dumps([{"prompt": "The capital of Spain is", "subject": "France",
                                     "target_new": "Paris", "case_id": 42}]))
    code = main(["edit", str(req_file), "--model", str(tiny_dir), "--set", "layers=[2,3]"])
    err = capsys.readouterr().err
    assert code == 2 and "case 42" in err and "not in the prompt" in err
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"prompt": "x"}]))
    assert main(["edit", str(missing), "--model", str(tiny_dir)]) == 2
    assert "missing field" in capsys.readouterr().err
