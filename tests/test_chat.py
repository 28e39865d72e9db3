"""Requests edited inside the tokenizer's chat template: the wrapper, where the subject, the
context prefixes, the target and the KL prompt go, the refusal of a tokenizer without a
template, and real edits of the bundled instruct model asked through its template."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import FAST, counterfact_requests

from encore_fast.editor import Editor
from encore_fast.errors import RequestError
from encore_fast.requests import EditRequest, chat_template, target_token_ids
from encore_fast.values.prompts import build_value_prompts

REQ = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", chat=True)


def test_the_prompt_is_the_user_turn_and_the_target_opens_the_answer(tokenizer):
    wrapped = chat_template(tokenizer, "{} is")
    want = tokenizer.apply_chat_template([{"role": "user", "content": "X is"}],
                                         add_generation_prompt=True, tokenize=False)
    assert wrapped.replace("{}", "X") == want
    assert want.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in want
    contexts = ["{}", "Because of this. {}"]
    vp = build_value_prompts(tokenizer, REQ, contexts)
    for ids, lookup, ctx in zip(vp.input_ids, vp.lookup, contexts, strict=False):
        text = tokenizer.decode(ids)
        user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert user == ctx.replace("{}", "The mother tongue of Danielle Darrieux is")
        assert tokenizer.decode(ids[lookup]).strip() == "ux"  # (the subject's last token)
        assert text.endswith("assistant\n")  # (a one-token target: nothing of it appended)
    assert vp.target_ids == target_token_ids(tokenizer, "English", chat=True)
    assert vp.target_ids != target_token_ids(tokenizer, "English")  # (no leading space)
    kl = tokenizer.decode(vp.input_ids[-1])
    assert "<|im_start|>user\nDanielle Darrieux is a<|im_end|>" in kl
    assert tokenizer.decode(vp.input_ids[-1][vp.lookup[-1]]).strip() == "ux"


def test_a_tokenizer_without_a_template_is_refused_before_anything_changes(
        tiny_models, tokenizer, corpus):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    model = copy.deepcopy(tiny_models["llama"])
    ed = Editor(model, plain, "encore", preset=None, corpus=corpus, stats_cache=False,
                progress=False, **FAST)
    w = ed.view.weight(3).detach().clone()
    with pytest.raises(RequestError, match="has none"):
        ed.edit([REQ])
    assert torch.equal(ed.view.weight(3), w) and ed.num_batches == 0


def test_an_editor_wide_switch_edits_in_the_template_and_saves_it(
        tiny_models, tokenizer, corpus, data_dir, tmp_path):
    reqs = counterfact_requests(data_dir, 0, 4)
    chat = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "encore", preset=None,
                  corpus=corpus, stats_cache=False, progress=False, chat=True, **FAST)
    chat.edit(reqs, batch_size=2)
    plain = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "encore", preset=None,
                   corpus=corpus, stats_cache=False, progress=False, **FAST)
    plain.edit(reqs, batch_size=2)
    assert all(r.chat for r in chat.requests) and not any(r.chat for r in plain.requests)
    assert not torch.equal(chat.view.weight(3), plain.view.weight(3))
    chat.save_edits(tmp_path / "e.safetensors")
    again = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "encore", preset=None,
                   corpus=corpus, stats_cache=False, progress=False, **FAST)
    again.load_edits(tmp_path / "e.safetensors")
    assert all(r.chat for r in again.requests)
    assert torch.equal(again.view.weight(3), chat.view.weight(3))


@pytest.mark.slow
def test_a_chat_edit_of_the_instruct_model_answers_in_the_template(smollm2, data_dir):
    model, tok = smollm2
    model = copy.deepcopy(model)
    record = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[7]
    req = EditRequest.from_dict(record)
    req = EditRequest(req.prompt, req.subject, req.target_new, req.ground_truth, chat=True)
    ed = Editor(model, tok, "encore", preset="smollm2-135m", corpus=data_dir / "wikitext-2" /
                "valid.txt", stats_samples=100, stats_cache=False, progress=False)

    def answer_prob(target: str) -> float:
        ids = tok(chat_template(tok, req.text), add_special_tokens=False)["input_ids"]
        first = target_token_ids(tok, target, chat=True)[0]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        return float(logits.softmax(-1)[first])

    before = answer_prob(req.target_new)
    ed.edit([req])
    assert answer_prob(req.target_new) > max(5 * before, answer_prob(req.ground_truth))


def test_eval_edits_in_the_template_and_asks_both_ways(tiny_dir, tmp_path, data_dir):
    from encore_fast.cli import main

    records = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())[:4]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    code = main(["eval", "--model", str(tiny_dir), "--chat", "--ask-chat", "--set",
                 "layers=[2,3]", "--set", "v_num_grad_steps=3", "--set", "stats_samples=8",
                 "--dataset", str(data), "--corpus", str(data_dir / "wikitext-2" / "valid.txt"),
                 "--num-edits", "4", "--batch-size", "2", "--wikitext", "none",
                 "--known-facts", "none", "--downstream", "none", "--out", str(out), "--quiet",
                 "--no-plots"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["run_info"]["chat"] is True
    last = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()
            if '"eval"' in x][-1]
    assert last["metrics"]["n_chat_es"] == 4 and 0 <= last["metrics"]["chat_es"] <= 1
    assert "es" in last["metrics"]  # (asked plain: the other way)


def test_asked_in_chat_scores_equal_a_direct_computation(tiny_models, tokenizer, data_dir):
    from encore_fast.eval.chat import chat_shares
    from encore_fast.eval.datasets import load_dataset

    path = data_dir / "counterfact" / "counterfact-edit.json"
    records = load_dataset(str(path))[:3]
    model = tiny_models["llama"]
    shares = chat_shares(model, tokenizer, records, batch_size=2)
    for i, rec in enumerate(records):
        ids = tokenizer(chat_template(tokenizer, rec.request.text),
                        add_special_tokens=False)["input_ids"]

        def mean_prob(target, ids=ids):
            t = target_token_ids(tokenizer, target, chat=True)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids + t[:-1]])).logits[0].log_softmax(-1)
            return sum(float(logp[len(ids) - 1 + j, tok].exp()) for j, tok in enumerate(t)) \
                / len(t)

        want = float(mean_prob(rec.request.target_new) > mean_prob(rec.request.ground_truth))
        assert shares["chat_es"][i] == want
