"""Shared fixtures: tiny random models built from configs, the bundled tokenizer and model,
and the real data folder (../shared/data)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import DATA_SKIP, find_data_dir, need_data

from encore_fast.models import bundled_model_dir, load_model

TINY = dict(hidden=64, inter=96, layers=6, heads=4)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = find_data_dir()
    if d is None:
        need_data("the CounterFact splits, WikiText-2, known facts and zsRE")
    return d


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how many tests were skipped for want of data, and how to get it."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if DATA_SKIP in str(getattr(r, "longrepr", ""))]
    if skipped:
        names = " ".join(n for n in ("counterfact-edit", "counterfact-train", "wikitext-2-valid",
                                     "known_1000", "zsre-train-1k", "downstream-sst2"))
        terminalreporter.write_line(
            f"data: {len(skipped)} test(s) skipped for want of the data sets; get them with "
            f"'encore-fast data fetch NAME' ({names}; 'encore-fast data list' names all), or "
            "point ENCORE_FAST_DATA at a copy", yellow=True)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from encore_fast.models import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(bundled_model_dir()))


def _tiny(kind: str, vocab: int) -> torch.nn.Module:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=TINY["hidden"],
                          intermediate_size=TINY["inter"], num_hidden_layers=TINY["layers"],
                          num_attention_heads=TINY["heads"], num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=TINY["hidden"], n_inner=TINY["inter"],
                         n_layer=TINY["layers"], n_head=TINY["heads"], n_positions=256,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.config.name_or_path = f"tiny-{kind}"
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tokenizer) -> dict[str, torch.nn.Module]:
    return {k: _tiny(k, len(tokenizer)) for k in ("llama", "gpt2")}


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tiny_models) -> torch.nn.Module:
    """A fresh copy of a tiny random model (tests may edit it)."""
    return copy.deepcopy(tiny_models[request.param])


@pytest.fixture(scope="session")
def corpus(data_dir) -> list[str]:
    lines = (data_dir / "wikitext-2" / "valid.txt").read_text().splitlines()
    texts = [t.strip() for t in lines if t.strip() and not t.strip().startswith("=")]
    return texts[:40]


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled model (SmolLM2-135M-Instruct), loaded once."""
    return load_model()


@pytest.fixture
def tiny_dir(tiny_models, tokenizer, tmp_path) -> Path:
    """The tiny random Llama saved with the bundled tokenizer, as a model folder."""
    path = tmp_path / "tiny-llama"
    tiny_models["llama"].save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
