"""Architecture knowledge: every supported family is detected, its edited matrix found with the
right layout, and both engines agree on it (GPT-J and GPT-NeoX here; Llama and GPT-2 run in
every other test)."""

from __future__ import annotations

import pytest
import torch

from encore_fast.config import make_config
from encore_fast.models import ArchSpec, ModelView, block_hidden, replace_block_hidden
from encore_fast.requests import EditRequest
from encore_fast.values import fast, reference
from encore_fast.values.keys import compute_keys
from encore_fast.values.prompts import build_value_prompts

CONTEXTS = ["{}", "Once upon a time. {}"]


def _model(kind: str, vocab: int) -> torch.nn.Module:
    from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if kind == "gptj":
        return GPTJForCausalLM(GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4,
                                          rotary_dim=8, n_positions=256, bos_token_id=0,
                                          eos_token_id=0)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, intermediate_size=96,
                                            max_position_embeddings=256, bos_token_id=0,
                                            eos_token_id=0)).eval()


@pytest.mark.parametrize("kind,d_in", [("gptj", 256), ("gpt_neox", 96)])
def test_detect_and_engines_agree(kind, d_in, tokenizer):
    model = _model(kind, len(tokenizer))
    view = ModelView(model)
    assert view.num_layers == 4 and view.d_model == 64 and view.d_in(2) == d_in
    # Keys are the inputs of the edited matrix: W·k reproduces the module's output.
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    k = compute_keys(view, tokenizer, [req], ["{}"], 2)
    assert k.shape == (1, d_in)
    mod = view.mlp_out(2)
    out = torch.nn.functional.linear(k, view.weight_out_in(2), getattr(mod, "bias", None))
    assert torch.allclose(out, mod(k), atol=1e-5)

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = make_config("encore", None, layers=[1, 2], v_num_grad_steps=5, clamp_norm_factor=4.0)
    prompts = [build_value_prompts(tokenizer, r, CONTEXTS) for r in
               (req, EditRequest("{} is a", "Microsoft", "fruit"))]
    ref = reference.optimize_values(view, tokenizer, prompts, 2, cfg)
    got = fast.optimize_values(view, tokenizer, prompts, 2, cfg)
    for r, g in zip(ref, got, strict=True):
        assert float((g.z - r.z).norm() / r.z.norm()) < 1e-4 and g.steps == r.steps


def test_gpt2_conv1d_is_transposed(tiny_models):
    view = ModelView(tiny_models["gpt2"])
    assert view.arch.transposed
    assert view.weight(1).shape == (96, 64) and view.weight_out_in(1).shape == (64, 96)


def test_unknown_architecture_needs_a_spec(tiny_models):
    model = tiny_models["llama"]
    model.config.model_type = "mystery"
    try:
        with pytest.raises(ValueError, match="ArchSpec"):
            ModelView(model)
        spec = ArchSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head")
        assert ModelView(model, spec).num_layers == 6
        with pytest.raises(ValueError, match="does not match"):
            ModelView(model, ArchSpec("model.blocks", "mlp.down_proj", "model.norm", "lm_head"))
    finally:
        model.config.model_type = "llama"


def test_block_outputs_tensor_or_tuple():
    h = torch.randn(2, 3, 4)
    assert block_hidden(h) is h and block_hidden((h, None)) is h
    g = torch.zeros_like(h)
    assert replace_block_hidden(h, g) is g
    out = replace_block_hidden((h, "cache"), g)
    assert isinstance(out, tuple) and out[0] is g and out[1] == "cache"
    with pytest.raises(TypeError):
        block_hidden({"x": h})
