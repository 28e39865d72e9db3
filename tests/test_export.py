"""The edited model exported as a transformers checkpoint: it loads with AutoModelForCausalLM,
its logits equal the live edited model's and differ from the unedited one's; a 16-bit model's
weights are its fp32 masters rounded once; the card and the edit list come with it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import small_editor
from transformers import AutoModelForCausalLM

from encore_fast.cli import main
from encore_fast.errors import ConfigError
from encore_fast.requests import EditRequest

CORPUS = ["The river runs past the old mill and into the valley below the town."] * 8
EDITS = [EditRequest("The capital of {} is", "France", "Rome", "Paris", case_id=1),
         EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar", case_id=2)]


def logits(model, tokenizer, text="The capital of France is"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def test_exported_checkpoint_loads_with_the_edits(tiny_models, tokenizer, tmp_path):
    unedited = copy.deepcopy(tiny_models["llama"])
    ed = small_editor(copy.deepcopy(unedited), tokenizer, CORPUS)
    ed.edit(EDITS)
    out = ed.save_pretrained(tmp_path / "edited")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    live = logits(ed.model, tokenizer)
    assert torch.equal(logits(loaded, tokenizer), live)
    assert not torch.allclose(logits(unedited, tokenizer), live)
    lines = (out / "edits.jsonl").read_text().splitlines()
    assert [json.loads(x)["target_new"] for x in lines] == ["Rome", "piano"]
    card = (out / "README.md").read_text()
    assert "encore" in card and "edits: 2" in card and '"lambda_p"' in card
    assert (out / "tokenizer_config.json").exists()
    assert not list(tmp_path.glob(".edited.*"))  # nothing half-written left
    with pytest.raises(ConfigError, match="not an empty folder"):
        ed.save_pretrained(out)
    ed.edit([EditRequest("{} is located in", "The Eiffel Tower", "London", "Paris")])
    ed.save_pretrained(out, overwrite=True)
    assert len((out / "edits.jsonl").read_text().splitlines()) == 3


def test_a_16_bit_model_is_exported_as_its_masters_rounded_once(tiny_models, tokenizer,
                                                               tmp_path):
    ed = small_editor(copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16), tokenizer, CORPUS)
    ed.edit(EDITS)
    out = ed.save_pretrained(tmp_path / "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for layer in ed.hparams.layers:
        w = loaded.model.layers[layer].mlp.down_proj.weight
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, ed.edited_weight(layer).to(torch.bfloat16))


def test_cli_edit_writes_the_model_too(tiny_dir, tmp_path, capsys):
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([r.to_dict() for r in EDITS]))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out_dir = tmp_path / "model"
    (out_dir / "x").mkdir(parents=True)  # a non-empty folder: refused before any work
    base = ["edit", str(reqs), "--model", str(tiny_dir), "--out", str(tmp_path / "e.st"),
            "--set", "layers=[2,3]", "--set", "v_num_grad_steps=2", "--set", "stats_samples=8",
            "--set", "stats_max_length=32", "--corpus", str(corpus)]
    assert main([*base, "--save-model", str(out_dir)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "e.st").exists()
    assert main([*base, "--gguf", "BF16"]) == 2  # (a GGUF goes into the --save-model folder)
    assert "give both" in capsys.readouterr().err
    assert main([*base, "--save-model", str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "model.safetensors").exists()
    assert "edited model:" in capsys.readouterr().out


@pytest.mark.slow
def test_the_bundled_model_is_also_exported_as_gguf_with_the_edits(smollm2, tmp_path):
    from encore_fast.editor import Editor

    model, tokenizer = smollm2
    ed = Editor(copy.deepcopy(model), tokenizer, "encore", model_name="smollm2-135m",
                corpus=CORPUS, stats_cache=False, progress=False, stats_samples=8,
                v_num_grad_steps=12, batch_size=2)
    ed.edit(EDITS)
    with pytest.raises(ConfigError, match="GGUF export needs"):
        ed.save_pretrained(tmp_path / "q4", gguf="Q4_1")  # (would round the edits away)
    out = ed.save_pretrained(tmp_path / "edited", gguf="BF16")
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf",
                                                  dtype=torch.float32).eval()
    for layer in ed.hparams.layers:
        w = loaded.model.layers[layer].mlp.down_proj.weight
        assert torch.equal(w, ed.edited_weight(layer).to(torch.bfloat16).float())
    live, back = logits(ed.model, tokenizer), logits(loaded, tokenizer)
    assert float((back - live).abs().max()) < 0.05 * float(live.abs().max())  # (bf16 layers)
    unedited = logits(model, tokenizer)
    assert float((back - live).norm()) < 0.1 * float((unedited - live).norm())
    rome = tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    assert int(back.argmax()) == int(live.argmax()) == rome  # the edited fact answered
