"""EasyEdit compatibility: hparams fields -> EditConfig, warnings, refusals, and EasyEdit's
``edit()`` call shape end to end on the tiny random models."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch

from encore_fast.compat import EasyEditor, read_hparams, summary_metrics, translate_hparams
from encore_fast.compat.easyedit import predicted_tokens, prepare_requests
from encore_fast.errors import ConfigError, RequestError
from encore_fast.requests import encode

# The field names of EasyEdit's hparams/MEMIT/llama-7b.yaml, values for the tiny Llama
# (6 layers); numbers written as EasyEdit writes them (5e-1 is text to YAML).
MEMIT_YAML = """\
alg_name: "MEMIT"
model_name: "./hugging_cache/tiny-llama"
stats_dir: "./data/stats"
device: 0
layers: [2, 3]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 4
v_lr: 5e-1
v_loss_layer: 5
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 10
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 16
mom2_dtype: "float32"
model_parallel: false
"""

# hparams/AlphaEdit/llama3-8b.yaml's field names.
ALPHAEDIT_YAML = MEMIT_YAML.replace('"MEMIT"', '"AlphaEdit"').replace(
    "model_parallel: false\n",
    'P_loc: "./null_space_project.pt"\nnullspace_threshold: 2e-2\nL2: 3\n')

# hparams/MEMIT/gpt2-xl.yaml's module paths (its LM head is the tied embedding matrix).
GPT2_YAML = (MEMIT_YAML.replace("model.layers.{}.mlp.down_proj", "transformer.h.{}.mlp.c_proj")
             .replace('"model.layers.{}"', '"transformer.h.{}"')
             .replace('"model.norm"', '"transformer.ln_f"')
             .replace('"lm_head"', '"transformer.wte"'))

CORPUS = [  # 16 distinct texts: enough distinct keys for a full-rank C0 (d_in = 96)
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Python is a programming language that lets you work quickly and integrate systems.",
    "The river flows slowly through the green valley and into the sea beyond the hills.",
    "Mount Everest is the highest mountain above sea level, located in the Himalayas.",
    "Bread is made from flour, water, salt and yeast, then baked in a hot stone oven.",
    "The orchestra played a symphony by Beethoven to a full concert hall last night.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "The Roman Empire was one of the largest empires of the ancient world around 117 AD.",
    "A violin has four strings tuned in perfect fifths and is played with a bow.",
    "Jupiter is the fifth planet from the Sun and the largest in the Solar System.",
    "The stock market fell sharply on Monday after the central bank raised interest rates.",
    "Honey bees communicate the location of flowers through a waggle dance in the hive.",
    "In 1969, Neil Armstrong became the first person to walk on the surface of the Moon.",
    "The chef seasoned the soup with thyme, black pepper and a pinch of sea salt.",
    "Glaciers carve deep U-shaped valleys as they move slowly down from the mountains.",
    "The library opens at nine and lends books, films and music to all its members.",
]
SMALL = dict(stats_max_length=32, stats_cache=False, progress=False, corpus=CORPUS)


def write(tmp_path, text, name="hparams.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def llama(tiny_models):
    return copy.deepcopy(tiny_models["llama"])


def quiet_translate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return translate_hparams(*args, **kwargs)


# ------------------------------------------------------------------------------ mapping

def test_memit_fields_map_onto_edit_config(tmp_path, llama):
    path = write(tmp_path, MEMIT_YAML)
    with pytest.warns(UserWarning) as rec:
        s = translate_hparams(path, llama)
    assert len(rec) == 1  # one warning per call, naming every field that does not apply
    message = str(rec[0].message)
    for name in ("model_name", "device", "stats_dir"):
        assert repr(name) in message
    assert str(path) in message
    assert {n for n, _ in s.ignored} == {"model_name", "device", "stats_dir"}
    assert s.method == "memit" and s.alg_name == "MEMIT"
    assert s.corpus == "wikimedia/wikipedia:20231101.en"
    cfg = s.config(6)
    assert cfg.layers == [2, 3]
    assert cfg.lambda_p == 10.0 and isinstance(cfg.lambda_p, float)
    assert cfg.v_lr == 0.5 and cfg.v_num_grad_steps == 4
    assert cfg.v_weight_decay == 1e-3 and cfg.clamp_norm_factor == 4.0
    assert cfg.kl_factor == 0.0625 and cfg.stats_samples == 16
    assert cfg.mpes_extra_steps is None and cfg.lambda_n == 0.0


def test_alphaedit_fields_map_onto_edit_config(tmp_path, llama):
    s = quiet_translate(write(tmp_path, ALPHAEDIT_YAML), llama)
    assert s.method == "alphaedit" and s.alg_name == "AlphaEdit"
    cfg = s.config(6)
    assert cfg.alpha == 3.0 and cfg.null_space_threshold == 0.02
    assert cfg.null_space_relative is False
    assert cfg.v_lr == 0.5 and cfg.layers == [2, 3]
    assert "P_loc" in {n for n, _ in s.ignored}


def test_batch_size_wikitext_and_method_override(tmp_path, llama):
    text = MEMIT_YAML.replace('"wikipedia"', '"wikitext2"') + "batch_size: 7\n"
    s = quiet_translate(write(tmp_path, text), llama, method="memit-seq")
    assert s.method == "memit-seq" and s.config(6).batch_size == 7
    assert s.corpus == "Salesforce/wikitext:wikitext-2-raw-v1"
    assert quiet_translate(write(tmp_path, text), llama, corpus_given=True).corpus is None


def test_gpt2_paths_and_tied_head_are_accepted(tmp_path, tiny_models):
    s = quiet_translate(write(tmp_path, GPT2_YAML), tiny_models["gpt2"])
    assert s.config(6).layers == [2, 3]


def test_inputs_mapping_object_and_path_without_suffix(tmp_path):
    write(tmp_path, MEMIT_YAML, "memit.yaml")
    raw, source = read_hparams(tmp_path / "memit")  # EasyEdit adds ".yaml"
    assert source.endswith("memit.yaml") and raw["v_lr"] == "5e-1"

    @dataclass
    class MEMITHyperParams:  # stands in for EasyEdit's HyperParams dataclass
        alg_name: str
        layers: list
        v_lr: float
        fact_token: str

    s = quiet_translate(MEMITHyperParams("MEMIT", [1, 2], 0.1, "subject_last"))
    assert s.config(6).layers == [1, 2] and s.config(6).v_lr == 0.1
    assert quiet_translate({"alg_name": "AlphaEdit", "L2": "1e1"}).config(6).alpha == 10.0


# ------------------------------------------------------------------------------ warnings

def test_unknown_field_is_named_in_a_warning(tmp_path, llama):
    text = MEMIT_YAML + "fp16: true\nmy_new_knob: 3\nlayer_selection_x: 1\n"
    with pytest.warns(UserWarning, match="my_new_knob") as rec:
        translate_hparams(write(tmp_path, text), llama)
    assert len(rec) == 1
    assert "'fp16'" in str(rec[0].message) and "'layer_selection_x'" in str(rec[0].message)


def test_inert_fields_warn_only_off_their_default(tmp_path, llama):
    s = quiet_translate(write(tmp_path, MEMIT_YAML), llama)
    assert not {"mom2_adjustment", "model_parallel", "mom2_dtype"} & {n for n, _ in s.ignored}
    text = (MEMIT_YAML.replace("mom2_adjustment: true", "mom2_adjustment: false")
            .replace("model_parallel: false", "model_parallel: true")
            .replace('"float32"', '"float64"'))
    s = quiet_translate(write(tmp_path, text), llama)
    assert {"mom2_adjustment", "model_parallel", "mom2_dtype"} <= {n for n, _ in s.ignored}


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("field, old, new", [
    ("alg_name", '"MEMIT"', '"ROME"'),
    ("fact_token", '"subject_last"', '"last"'),
    ("rewrite_module_tmp", "mlp.down_proj", "mlp.up_proj"),
    ("rewrite_module_tmp", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj"),
    ("rewrite_module_tmp", "model.layers.{}.mlp.down_proj", "model.layers.0.mlp.down_proj"),
    ("rewrite_module_tmp", "model.layers.{}.mlp.down_proj", "other.layers.{}.mlp.down_proj"),
    ("layer_module_tmp", '"model.layers.{}"', '"model.layers.{}.mlp"'),
    ("ln_f_module", '"model.norm"', '"model.layers.0.input_layernorm"'),
    ("lm_head_module", '"lm_head"', '"model.embed_tokens"'),  # not tied in the tiny Llama
    ("v_loss_layer", "v_loss_layer: 5", "v_loss_layer: 2"),
    ("mom2_dataset", '"wikipedia"', '"c4"'),
    ("layers", "[2, 3]", "[2, 9]"),
    ("layers", "[2, 3]", "[3, 2]"),
    ("v_lr", "5e-1", "fast"),
    ("mom2_n_samples", "mom2_n_samples: 16", "mom2_n_samples: 1.5"),
    ("mom2_update_weight", "mom2_update_weight: 10", "mom2_update_weight: -1"),
])
def test_refused_values_name_file_and_field(tmp_path, llama, field, old, new):
    assert old in MEMIT_YAML
    path = write(tmp_path, MEMIT_YAML.replace(old, new))
    with pytest.raises(ConfigError) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        translate_hparams(path, llama)
    assert f"'{field}'" in str(exc.value) and str(path) in str(exc.value)


def test_missing_alg_name_and_file(tmp_path):
    with pytest.raises(ConfigError, match="alg_name"):
        translate_hparams({"layers": [1]})
    with pytest.raises(ConfigError, match="no such hparams file"):
        translate_hparams(tmp_path / "absent.yaml")


def test_from_hparams_needs_model_and_tokenizer_together(tiny_models):
    with pytest.raises(ConfigError, match="both model and tokenizer"):
        EasyEditor.from_hparams({"alg_name": "MEMIT"}, tiny_models["llama"])


# ------------------------------------------------------------------------------ requests

def test_prepare_requests_layout_and_errors():
    recs = prepare_requests(["A is in", "B is in"], ["X", "Y"], subject=["A", "B"],
                            rephrase_prompts=["A lies in", "B lies in"],
                            locality_inputs={"nb": {"prompt": ["C is in", None],
                                                    "ground_truth": ["Z", None]}})
    assert recs[0] == {"prompt": "A is in", "target_new": "X", "ground_truth": None,
                       "portability": {}, "locality": {"nb": {"prompt": "C is in",
                                                               "ground_truth": "Z"}},
                       "subject": "A", "rephrase_prompt": "A lies in"}
    assert recs[1]["locality"] == {}
    with pytest.raises(RequestError, match="subject"):
        prepare_requests(["A is in", "B is in"], ["X", "Y"], subject=["A"])


def test_predicted_tokens_follow_easyedit_tokenisation(tiny_models, tokenizer):
    preds, labels = predicted_tokens(tiny_models["llama"], tokenizer, "The capital is", "Rome")
    full = encode(tokenizer, "The capital is Rome")
    assert labels == full[len(encode(tokenizer, "The capital is")):]
    assert len(preds) == len(labels) >= 1


# ------------------------------------------------------------------------------ end to end

def edit_args():
    return dict(
        prompts=["The mother tongue of Danielle Darrieux is", "Paris is the capital of"],
        ground_truth=["French", "France"], target_new=["English", "Italy"],
        subject=["Danielle Darrieux", "Paris"],
        rephrase_prompts=["Danielle Darrieux grew up speaking", "Paris is a city in"],
        locality_inputs={"neighborhood": {"prompt": ["Berlin is the capital of",
                                                     "The Nile flows through"],
                                          "ground_truth": ["Germany", "Egypt"]}})


# A larger step and ball than the published ones, so that 4 steps suffice on the random model.
STRONG_YAML = MEMIT_YAML.replace("v_lr: 5e-1", "v_lr: 3").replace("clamp_norm_factor: 4",
                                                                  "clamp_norm_factor: 20")


def test_sequential_edit_returns_easyedit_shape(tmp_path, llama, tokenizer):
    with pytest.warns(UserWarning, match="stats_dir"):
        editor = EasyEditor.from_hparams(write(tmp_path, STRONG_YAML), llama, tokenizer,
                                         **SMALL)
    original = {n: p.detach().clone() for n, p in llama.named_parameters()}
    metrics, edited, weights_copy = editor.edit(**edit_args(), sequential_edit=True,
                                                verbose=False)
    assert edited is llama and editor.editor.num_batches == 2
    # the first fact is learnt: 0 of its target tokens before, all of them after
    assert metrics[0]["pre"]["rewrite_acc"] == [0.0] and metrics[0]["post"]["rewrite_acc"] == [1.0]
    assert [m["case_id"] for m in metrics] == [0, 1]
    for m in metrics:
        assert set(m) == {"pre", "case_id", "requested_rewrite", "post", "time"}
        assert m["time"] > 0 and m["requested_rewrite"]["subject"] in m["requested_rewrite"][
            "prompt"]
        for phase in ("pre", "post"):
            assert len(m[phase]["rewrite_acc"]) == 1 and len(m[phase]["rephrase_acc"]) == 1
            assert 0.0 <= m[phase]["rewrite_acc"][0] <= 1.0
            assert len(m[phase]["locality"]["neighborhood_output"][0]) >= 1
        assert "neighborhood_acc" not in m["pre"]["locality"]
        assert 0.0 <= m["post"]["locality"]["neighborhood_acc"][0] <= 1.0
    assert set(weights_copy) == {"model.layers.2.mlp.down_proj.weight",
                                 "model.layers.3.mlp.down_proj.weight"}
    params = dict(llama.named_parameters())
    for name, w0 in weights_copy.items():
        assert torch.equal(w0, original[name])  # from before the call
        assert not torch.equal(params[name], w0)  # the model was edited
    summary = summary_metrics(metrics)
    assert set(summary) == {"pre", "post"} and "neighborhood_acc" in summary["post"]["locality"]


def test_non_sequential_edit_rolls_each_request_back(tmp_path, llama, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor = EasyEditor.from_hparams(write(tmp_path, ALPHAEDIT_YAML), llama, tokenizer,
                                         **SMALL)
    before = editor.weights_copy()
    args = edit_args()
    args.pop("locality_inputs")
    metrics, edited, weights_copy = editor.edit(**args, verbose=False)
    assert len(metrics) == 2 and editor.editor.num_batches == 0
    for name, w in dict(edited.named_parameters()).items():
        if name in weights_copy:
            assert torch.equal(w, weights_copy[name]) and torch.equal(w, before[name])
    assert metrics[0]["pre"]["locality"] == {} and "rephrase_acc" in metrics[1]["post"]


def test_from_hparams_loads_model_name(tmp_path, tiny_dir):
    text = MEMIT_YAML.replace('"./hugging_cache/tiny-llama"', f'"{tiny_dir}"')
    with pytest.warns(UserWarning) as rec:
        editor = EasyEditor.from_hparams(write(tmp_path, text), **SMALL)
    message = str(rec[0].message)
    assert "'stats_dir'" in message and "'model_name'" not in message
    assert "'device'" not in message  # (used to load: cuda:0 on a GPU, else the CPU)
    assert editor.hparams.layers == [2, 3] and editor.model.dtype == torch.float32
