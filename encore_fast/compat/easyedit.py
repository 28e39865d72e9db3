"""EasyEdit's hparams files and call shape on top of :class:`encore_fast.Editor`.

Switch in one line: where EasyEdit code says ``BaseEditor.from_hparams(hparams)``, write
``EasyEditor.from_hparams("hparams/MEMIT/llama3-8b.yaml")`` (or pass ``model=, tokenizer=``);
``edit(...)`` takes EasyEdit's arguments and returns its ``(metrics, edited_model,
weights_copy)``.

Fields of EasyEdit's MEMIT and AlphaEdit hparams (``alg_name: MEMIT`` / ``AlphaEdit``):

=======================  ====================================================================
EasyEdit field           here
=======================  ====================================================================
alg_name                 method: MEMIT -> ``"memit"``, AlphaEdit -> ``"alphaedit"`` (required;
                         any other value is refused). EasyEdit's MEMIT never adds earlier
                         edits' keys to its system, so it is ``"memit"`` also for
                         ``sequential_edit=True``; ``method="memit-seq"`` (or ``"encore"``)
                         to ``from_hparams`` chooses another update rule with the same fields
layers                   ``layers``
mom2_update_weight       ``lambda_p`` (AlphaEdit reads it in neither project)
v_lr                     ``v_lr``
v_num_grad_steps         ``v_num_grad_steps``
v_weight_decay           ``v_weight_decay``
clamp_norm_factor        ``clamp_norm_factor``
kl_factor                ``kl_factor``
mom2_n_samples           ``stats_samples``
batch_size               ``batch_size`` (:meth:`EasyEditor.batch_edit`'s chunks; ``edit``
                         edits one request at a time, as EasyEdit's does)
L2 (AlphaEdit)           ``alpha``
nullspace_threshold      ``null_space_threshold`` with ``null_space_relative=False``
(AlphaEdit)              (EasyEdit keeps eigen-directions of C0 below an absolute threshold)
mom2_dataset             the corpus for ``C0``: wikipedia -> ``wikimedia/wikipedia:20231101.en``,
                         wikitext -> ``Salesforce/wikitext:wikitext-103-raw-v1``, wikitext2 ->
                         ``...:wikitext-2-raw-v1`` (the data sets EasyEdit loads, streamed with
                         ``datasets``); ``corpus=`` or ``stats=`` replace it. Other values are
                         refused unless one of those is given
fact_token               only ``subject_last`` (the token encore_fast edits); others refused
v_loss_layer             must resolve to the last block (EasyEdit uses ``max(v_loss_layer,
                         layers[-1])``; encore_fast's loss is on the model's own logits);
                         anything else is refused
rewrite_module_tmp,      checked against the model: they must name the MLP output projection
layer_module_tmp,        encore_fast edits, the decoder blocks, the final norm and the LM head
ln_f_module,             (a head tied to the embeddings counts); anything else is refused
lm_head_module
model_name, device,      used to load the model when ``from_hparams`` gets none (fp16 ->
fp16                     float16 weights, else float32; ``device: 0`` -> ``cuda:0`` when there
                         is a GPU); ignored with a warning when a model is given
model_parallel: true,    ignored with a warning (pass a ``device_map`` model instead; C0 is
stats_dir, P_loc,        cached by encore_fast, ``stats_cache=`` chooses where; AlphaEdit's
mom2_dtype != float32    projector is computed from C0; C0 is accumulated in float32)
layer_selection,         read by neither EasyEdit method (``max_length`` only bounds a
mom2_adjustment,         truncation that never cuts): accepted; ``layer_selection`` other than
mlp_module_tmp,          ``all`` and ``mom2_adjustment`` other than ``true`` are named in the
attn_module_tmp,         warning
max_length
=======================  ====================================================================

Any other field is named in the warning and ignored. Fields a file leaves out keep
encore_fast's generic settings (``preset=None``); every :class:`~encore_fast.EditConfig`
field (e.g. ``stats_max_length``, 256 here where EasyEdit reads whole articles) can be set by
keyword. Values are read as EasyEdit reads them (``5e-1`` written without a dot is a number).

Metrics follow EasyEdit's token-level teacher forcing: ``prompt + " " + target`` is tokenised
as one text and ``*_acc`` is the share of target tokens the model predicts top-1; locality
stores the predicted tokens (``{key}_output``) and, after the edit, the share that stayed the
same (``{key}_acc``). Not reproduced: ``metric_meta``, ``test_generation`` (fluency), LLM-judge
and perplexity evaluation, and EasyEdit's ``logs/results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encore_fast.config import EditConfig, make_config
from encore_fast.editor import Editor
from encore_fast.errors import ConfigError, RequestError
from encore_fast.models.arch import ARCHITECTURES, ArchSpec, ModelView
from encore_fast.models.hooks import editing_mode
from encore_fast.models.loading import load_model
from encore_fast.models.placement import input_device
from encore_fast.requests import EditRequest, encode, subject_position

LOG = logging.getLogger(__name__)

ALGORITHMS = {"memit": ("MEMIT", "memit"), "alphaedit": ("AlphaEdit", "alphaedit")}
MAPPED = {  # EasyEdit field -> EditConfig field, both methods
    "layers": "layers", "mom2_update_weight": "lambda_p", "v_lr": "v_lr",
    "v_num_grad_steps": "v_num_grad_steps", "v_weight_decay": "v_weight_decay",
    "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor",
    "mom2_n_samples": "stats_samples", "batch_size": "batch_size",
}
MAPPED_ALPHAEDIT = {"L2": "alpha", "nullspace_threshold": "null_space_threshold"}
INT_FIELDS = {"v_num_grad_steps", "mom2_n_samples", "batch_size", "v_loss_layer", "max_length"}
DATASETS = {  # mom2_dataset -> the Hugging Face data set EasyEdit loads ("name:config")
    "wikipedia": "wikimedia/wikipedia:20231101.en",
    "wikitext": "Salesforce/wikitext:wikitext-103-raw-v1",
    "wikitext2": "Salesforce/wikitext:wikitext-2-raw-v1",
}
INERT = {"layer_selection": "all", "mom2_adjustment": True, "mlp_module_tmp": None,
         "attn_module_tmp": None, "max_length": None}  # field -> the value it warns beside
LOADING = ("model_name", "device", "fp16")
CHECKED = ("alg_name", "fact_token", "v_loss_layer", "mom2_dataset", "rewrite_module_tmp",
           "layer_module_tmp", "ln_f_module", "lm_head_module")
IGNORED_WHY = {
    "model_parallel": "pass a model loaded with a device_map instead",
    "stats_dir": "C0 is cached by encore_fast; stats_cache= chooses where",
    "P_loc": "AlphaEdit's projector is computed from C0 and nullspace_threshold",
    "mom2_dtype": "C0 is accumulated in float32",
}
AS_HERE = {"mom2_dtype": "float32", "model_parallel": False}  # values that need no warning
_MLP_OUTS = {spec.mlp_out for spec in ARCHITECTURES.values()}


@dataclass(frozen=True)
class EasyEditSettings:
    """What one EasyEdit hparams file means here.

    ``settings`` are :class:`EditConfig` overrides, ``corpus`` the data set for ``C0`` (None:
    the caller gives one), ``ignored`` the ``(field, reason)`` pairs that were warned about.
    """

    source: str
    alg_name: str
    method: str
    settings: dict[str, Any]
    corpus: str | None = None
    ignored: tuple[tuple[str, str], ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)

    def config(self, num_layers: int | None = None) -> EditConfig:
        """The :class:`EditConfig` these settings give (``preset=None`` underneath); a bad
        value raises :class:`ConfigError` naming the file and the EasyEdit field."""
        try:
            return make_config(self.method, None, num_layers, **self.settings)
        except ConfigError as exc:
            ours = str(exc).split(" ", 1)[0]
            names = {v: k for k, v in {**MAPPED, **MAPPED_ALPHAEDIT}.items()}
            where = "settings" if ours not in names else (
                f"field {ours!r}" if names[ours] == ours else f"field {names[ours]!r} ({ours})")
            raise ConfigError(f"{self.source}: {where}: {exc}") from exc


def read_hparams(hparams: Any) -> tuple[dict[str, Any], str]:
    """EasyEdit hparams as a dict, and a label for messages: a ``.yaml``/``.yml``/``.json``
    path (``.yaml`` added when it has no suffix, as EasyEdit does), a mapping, or an EasyEdit
    ``HyperParams`` object. Numbers written as text (``5e-1``) are read later, per field."""
    if isinstance(hparams, Mapping):
        return dict(hparams), "hparams mapping"
    if isinstance(hparams, (str, os.PathLike)):
        return _read_file(Path(hparams))
    if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        return dataclasses.asdict(hparams), f"{type(hparams).__name__} object"
    if hasattr(hparams, "__dict__"):
        return dict(vars(hparams)), f"{type(hparams).__name__} object"
    raise ConfigError(f"hparams must be a file path, a mapping or an EasyEdit HyperParams "
                      f"object, got {type(hparams).__name__}")


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    if not path.exists() and path.suffix not in (".yaml", ".yml", ".json"):
        path = path.with_name(path.name + ".yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: no such hparams file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml  # optional: only EasyEdit's YAML files need PyYAML
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of EasyEdit fields, got "
                          f"{type(data).__name__}")
    return data, str(path)


def translate_hparams(hparams: Any, model: torch.nn.Module | None = None, *,
                      arch: ArchSpec | None = None, method: str | None = None,
                      corpus_given: bool = False) -> EasyEditSettings:
    """Map EasyEdit MEMIT/AlphaEdit hparams onto encore_fast settings.

    Fields that do not apply are named in one warning; a value encore_fast cannot honour
    raises :class:`ConfigError` naming the file, the field and the problem. With ``model``,
    the module templates and ``v_loss_layer`` are checked against it. ``method`` replaces the
    mapped update rule; ``corpus_given``: the caller gives ``corpus=``/``stats=`` (then
    ``mom2_dataset`` is not needed).
    """
    raw, source = read_hparams(hparams)
    return _translate(raw, source, model, arch=arch, method=method, corpus_given=corpus_given,
                      loaded=False)


def _translate(raw: dict[str, Any], source: str, model: torch.nn.Module | None, *,
               arch: ArchSpec | None, method: str | None, corpus_given: bool,
               loaded: bool) -> EasyEditSettings:
    alg_name, mapped = _algorithm(raw, source)
    _check_static(raw, source)
    settings = {ours: _value(raw, easy, source)
                for easy, ours in {**MAPPED, **_extra_fields(alg_name)}.items() if easy in raw}
    if alg_name == "AlphaEdit":
        settings["null_space_relative"] = False
    view = ModelView(model, arch) if model is not None else None
    if view is not None:
        layers = settings.get("layers") or make_config(mapped, None, view.num_layers).layers
        _check_model(raw, source, view, layers)
    ignored = _ignored(raw, alg_name, loaded)
    out = EasyEditSettings(source, alg_name, method or mapped, settings,
                           _corpus(raw, source, corpus_given), tuple(ignored), raw)
    out.config(view.num_layers if view is not None else None)  # (refuse before warning)
    if ignored:
        listed = "; ".join(f"{name!r} ({why})" for name, why in ignored)
        warnings.warn(f"{source}: EasyEdit fields that do not apply here, ignored: {listed}",
                      stacklevel=3)
    return out


def _algorithm(raw: Mapping[str, Any], source: str) -> tuple[str, str]:
    name = raw.get("alg_name")
    if name is None:
        raise ConfigError(f"{source}: field 'alg_name' is missing (MEMIT or AlphaEdit)")
    key = str(name).lower()
    if key not in ALGORITHMS:
        raise ConfigError(f"{source}: field 'alg_name': {name!r} is not supported; encore_fast "
                          "reads EasyEdit's MEMIT and AlphaEdit hparams")
    return ALGORITHMS[key]


def _extra_fields(alg_name: str) -> dict[str, str]:
    return MAPPED_ALPHAEDIT if alg_name == "AlphaEdit" else {}


def _value(raw: Mapping[str, Any], name: str, source: str) -> Any:
    """``raw[name]`` as encore_fast wants it: numbers from text, integers where needed."""
    value = raw[name]
    if name == "layers":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: field 'layers': expected a list of layer indices, "
                              f"got {value!r}")
        return [_number(v, name, source, integer=True) for v in value]
    return _number(value, name, source, integer=name in INT_FIELDS)


def _number(value: Any, name: str, source: str, integer: bool) -> int | float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: field {name!r}: expected {kind}, got {value!r}")
    if integer:
        if not float(value).is_integer():
            raise ConfigError(f"{source}: field {name!r}: expected {kind}, got {value!r}")
        return int(value)
    return float(value)


def _check_static(raw: Mapping[str, Any], source: str) -> None:
    """Refusals that need no model: the fact token and the shape of the module templates."""
    token = raw.get("fact_token", "subject_last")
    if token != "subject_last":
        raise ConfigError(f"{source}: field 'fact_token': {token!r} is not supported; "
                          "encore_fast edits at the subject's last token ('subject_last')")
    for name in ("rewrite_module_tmp", "layer_module_tmp"):
        tmp = raw.get(name)
        if tmp is not None and (not isinstance(tmp, str) or "{}" not in tmp):
            raise ConfigError(f"{source}: field {name!r}: expected a module path with '{{}}' "
                              f"for the layer, got {tmp!r}")
    tmp = raw.get("rewrite_module_tmp")
    if tmp is not None and not any(tmp.endswith("." + m) for m in _MLP_OUTS):
        raise ConfigError(
            f"{source}: field 'rewrite_module_tmp': {tmp!r} is not an MLP output projection; "
            f"encore_fast edits only that matrix (one of {sorted(_MLP_OUTS)})")
    if "v_loss_layer" in raw:
        _number(raw["v_loss_layer"], "v_loss_layer", source, integer=True)


def _check_model(raw: Mapping[str, Any], source: str, view: ModelView,
                 layers: Sequence[int]) -> None:
    """The module templates must name what encore_fast edits and reads in this model."""
    arch, model = view.arch, view.model
    bad = [layer for layer in layers if not 0 <= layer < view.num_layers]
    if bad:
        raise ConfigError(f"{source}: field 'layers': {bad} do not exist; the model has "
                          f"{view.num_layers} layers")
    per_layer = {
        "rewrite_module_tmp": (view.mlp_out, f"{arch.blocks}.{{}}.{arch.mlp_out}"),
        "layer_module_tmp": (lambda l: view.blocks[l], f"{arch.blocks}.{{}}"),
    }
    for name, (expected, spelled) in per_layer.items():
        tmp = raw.get(name)
        for layer in layers if tmp is not None else ():
            path = _format(tmp, layer, name, source)
            if _submodule(model, path) is not expected(layer):
                raise ConfigError(f"{source}: field {name!r}: {path!r} is not the module "
                                  f"encore_fast uses in this model ({spelled!r})")
    if "ln_f_module" in raw and _submodule(model, raw["ln_f_module"]) is not view.final_norm:
        raise ConfigError(f"{source}: field 'ln_f_module': {raw['ln_f_module']!r} is not the "
                          f"model's final norm ({arch.final_norm!r})")
    if "lm_head_module" in raw:
        head = getattr(_submodule(model, raw["lm_head_module"]), "weight", None)
        if head is None or head is not view.lm_head.weight:
            raise ConfigError(f"{source}: field 'lm_head_module': {raw['lm_head_module']!r} "
                              f"does not hold the model's LM head weight ({arch.lm_head!r})")
    if "v_loss_layer" in raw:
        loss = max(_number(raw["v_loss_layer"], "v_loss_layer", source, True), max(layers))
        if loss != view.num_layers - 1:
            raise ConfigError(
                f"{source}: field 'v_loss_layer': EasyEdit would tie the value loss to block "
                f"{loss}; encore_fast uses the model's logits, i.e. the last block "
                f"({view.num_layers - 1}): set v_loss_layer: {view.num_layers - 1}")


def _format(tmp: str, layer: int, name: str, source: str) -> str:
    try:
        return tmp.format(layer)
    except (IndexError, KeyError, ValueError):
        raise ConfigError(f"{source}: field {name!r}: cannot fill {tmp!r} with a layer "
                          "number") from None


def _submodule(model: torch.nn.Module, path: Any) -> torch.nn.Module | None:
    try:
        return model.get_submodule(str(path))
    except AttributeError:
        return None


def _corpus(raw: Mapping[str, Any], source: str, corpus_given: bool) -> str | None:
    dataset = raw.get("mom2_dataset")
    if corpus_given:
        return None
    if dataset is None:
        return DATASETS["wikipedia"]
    if dataset not in DATASETS:
        raise ConfigError(f"{source}: field 'mom2_dataset': {dataset!r} is not a data set "
                          f"encore_fast can provide ({sorted(DATASETS)}); pass corpus= (texts "
                          "or a file) or stats= to the editor instead")
    return DATASETS[dataset]


def _ignored(raw: Mapping[str, Any], alg_name: str, loaded: bool) -> list[tuple[str, str]]:
    """``(field, reason)`` for every field that does not apply, in the file's order."""
    known = set(MAPPED) | set(_extra_fields(alg_name)) | set(CHECKED)
    out = []
    for name, value in raw.items():
        if name in known or (name in LOADING and loaded):
            continue
        if name in INERT:
            if INERT[name] is not None and value != INERT[name]:
                out.append((name, f"EasyEdit's {alg_name} does not read it either"))
        elif name in LOADING:
            out.append((name, "the model given is used as it is"))
        elif name in IGNORED_WHY:
            if name not in AS_HERE or value != AS_HERE[name]:
                out.append((name, IGNORED_WHY[name]))
        else:
            out.append((name, f"not a field of EasyEdit's {alg_name} hparams"))
    return out


def load_from_hparams(raw: Mapping[str, Any], source: str) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` as EasyEdit does from ``model_name``, ``fp16``, ``device``."""
    name = raw.get("model_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: field 'model_name': needed to load the model when none "
                          f"is given, got {name!r}")
    dtype = torch.float16 if raw.get("fp16") else torch.float32
    device = raw.get("device")
    if not torch.cuda.is_available():
        device = "cpu"
    elif device is None:
        device = "cuda"
    elif isinstance(device, int) or str(device).isdigit():
        device = f"cuda:{device}"
    return load_model(name, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- the editor

class EasyEditor:
    """EasyEdit's ``BaseEditor`` call shape on an :class:`encore_fast.Editor`.

    ``edit`` (one request at a time) and ``batch_edit`` (chunks of ``batch_size``) return
    ``(metrics, edited_model, weights_copy)`` as EasyEdit does:

    * ``sequential_edit=False`` (EasyEdit's default): each request (chunk) is edited on the
      model as it was when the call began, scored, and taken back with :meth:`Editor.undo`
      (weights and sequential state), as EasyEdit restores its weights copy after each. The
      returned model is therefore the unedited one. (EasyEdit's AlphaEdit keeps adding taken
      back requests' keys to its cache; here a taken back edit leaves no trace.)
    * ``sequential_edit=True``: requests are edited one after another and kept. A request's
      ``post`` metrics are measured right after its own edit, before the later ones, as
      EasyEdit's ``edit`` does.

    ``edit`` computes every request's ``pre`` metrics first; ``batch_edit`` those of each
    chunk before editing it (so, sequentially, after the earlier chunks), as EasyEdit does.
    ``weights_copy`` maps each edited weight's parameter name to a copy of it from before
    the call (EasyEdit returns the weights from before the last request, the same thing
    unless ``sequential_edit=True`` edits several); copying them back restores the model,
    though :meth:`reset` (or ``editor.undo()``) also restores the editor's state.
    """

    def __init__(self, settings: EasyEditSettings, model: torch.nn.Module, tokenizer: Any,
                 **editor_kwargs: Any) -> None:
        """Wrap ``model`` in an :class:`Editor` with ``settings`` (see :meth:`from_hparams`);
        ``editor_kwargs`` override them."""
        kwargs = {**settings.settings, **editor_kwargs}
        preset = kwargs.pop("preset", None)
        if settings.corpus is not None and kwargs.get("corpus") is None and kwargs.get(
                "stats") is None:
            kwargs["corpus"] = settings.corpus
        self.settings = settings
        self.alg_name = settings.alg_name
        self.editor = Editor(model, tokenizer, settings.method, preset, **kwargs)
        self.model = model
        self.tok = self.editor.tokenizer
        self.hparams = self.editor.hparams

    @classmethod
    def from_hparams(cls, hparams: Any, model: torch.nn.Module | None = None,
                     tokenizer: Any = None, *, method: str | None = None,
                     arch: ArchSpec | None = None, **editor_kwargs: Any) -> EasyEditor:
        """An editor from EasyEdit hparams (a file path, mapping or ``HyperParams`` object).

        Without ``model`` and ``tokenizer`` they are loaded from the file's ``model_name``
        (``fp16``, ``device``). ``method`` replaces the mapped update rule (e.g.
        ``"memit-seq"``); ``editor_kwargs`` go to :class:`encore_fast.Editor` (``corpus=``,
        ``stats=``, ``engine=``, ``stats_cache=``, any :class:`EditConfig` field, ...).
        """
        if (model is None) != (tokenizer is None):
            raise ConfigError("give both model and tokenizer, or neither (then the hparams' "
                              "model_name is loaded)")
        raw, source = read_hparams(hparams)
        loaded = model is None
        if model is None:
            _algorithm(raw, source)  # (refuse an unknown method before loading a model)
            model, tokenizer = load_from_hparams(raw, source)
        given = editor_kwargs.get("corpus") is not None or editor_kwargs.get("stats") is not None
        settings = _translate(raw, source, model, arch=arch, method=method,
                              corpus_given=given, loaded=loaded)
        return cls(settings, model, tokenizer, arch=arch, **editor_kwargs)

    def reset(self) -> None:
        """Back to the original model: weights and sequential state (:meth:`Editor.reset`)."""
        self.editor.reset()

    def edit(self, prompts: str | list[str], target_new: str | list[str],
             ground_truth: str | list[str] | None = None,
             target_neg: str | list[str] | None = None,
             rephrase_prompts: str | list[str] | None = None,
             locality_inputs: Mapping[str, Any] | None = None,
             portability_inputs: Mapping[str, Any] | None = None,
             sequential_edit: bool = False, verbose: bool = True, **kwargs: Any
             ) -> tuple[list[dict[str, Any]], torch.nn.Module, dict[str, torch.Tensor]]:
        """Edit and score each request alone, as EasyEdit's ``BaseEditor.edit`` does (see
        the class docstring); ``subject=`` is needed (MEMIT and AlphaEdit edit a subject)."""
        records = self._records(prompts, target_new, ground_truth, target_neg,
                                rephrase_prompts, locality_inputs, portability_inputs, kwargs)
        return self._run(records, 1, sequential_edit, pre_first=True, verbose=verbose)

    def batch_edit(self, prompts: list[str], target_new: list[str],
                   ground_truth: list[str] | None = None,
                   target_neg: list[str] | None = None,
                   rephrase_prompts: list[str] | None = None,
                   locality_inputs: Mapping[str, Any] | None = None,
                   portability_inputs: Mapping[str, Any] | None = None,
                   sequential_edit: bool = False, verbose: bool = True, **kwargs: Any
                   ) -> tuple[list[dict[str, Any]], torch.nn.Module, dict[str, torch.Tensor]]:
        """Edit in chunks of ``batch_size`` (one update per chunk), as EasyEdit's
        ``batch_edit``; each request's ``time`` is its chunk's."""
        records = self._records(prompts, target_new, ground_truth, target_neg,
                                rephrase_prompts, locality_inputs, portability_inputs, kwargs)
        size = self.hparams.batch_size
        return self._run(records, size, sequential_edit, pre_first=False, verbose=verbose)

    def _records(self, prompts: Any, target_new: Any, ground_truth: Any, target_neg: Any,
                 rephrase: Any, locality: Any, portability: Any,
                 kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        if "requests" in kwargs:
            records = [dict(r) for r in kwargs.pop("requests")]
        else:
            records = prepare_requests(prompts, target_new, ground_truth, target_neg, rephrase,
                                       locality, portability, kwargs.pop("subject", None))
        unused = sorted(k for k, v in kwargs.items()
                        if v not in (None, False) and v not in ("exact match", "token_em"))
        if unused:
            warnings.warn(f"EasyEditor ignores these edit() arguments: {unused}", stacklevel=3)
        for i, rec in enumerate(records):
            if "subject" not in rec or rec["subject"] is None:
                raise RequestError(f"request {i} ({rec.get('prompt')!r}): MEMIT and AlphaEdit "
                                   "need its subject; pass subject=[...] to edit()")
        return records

    def _run(self, records: list[dict[str, Any]], size: int, sequential: bool,
             pre_first: bool, verbose: bool
             ) -> tuple[list[dict[str, Any]], torch.nn.Module, dict[str, torch.Tensor]]:
        """Pre-score, edit, post-score and (unless sequential) undo, chunk by chunk."""
        requests = [_edit_request(rec, i) for i, rec in enumerate(records)]
        before = self.weights_copy()
        pre = [self._quality(rec) for rec in records] if pre_first else [None] * len(records)
        metrics: list[dict[str, Any]] = []
        for start in range(0, len(records), size):
            chunk = range(start, min(start + size, len(records)))
            for i in chunk:
                pre[i] = pre[i] if pre[i] is not None else self._quality(records[i])
            t0 = time.perf_counter()
            self.editor.edit([requests[i] for i in chunk], batch_size=len(chunk))
            seconds = time.perf_counter() - t0
            for i in chunk:
                post = self._quality(records[i])
                _finish_locality(pre[i], post)
                metrics.append({"pre": pre[i], "case_id": i, "requested_rewrite": records[i],
                                "post": post, "time": seconds})
                if verbose:
                    LOG.info("%d editing: %s -> %s\n%s", i, records[i]["prompt"],
                             records[i]["target_new"], metrics[-1])
            if not sequential:
                self.editor.undo()
        return metrics, self.model, before

    def weights_copy(self) -> dict[str, torch.Tensor]:
        """Parameter name -> a copy of each edited weight as the model stores it now."""
        view = self.editor.view
        return {f"{view.arch.blocks}.{layer}.{view.arch.mlp_out}.weight":
                view.weight(layer).detach().clone() for layer in self.hparams.layers}

    def _quality(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """EasyEdit's ``compute_edit_quality`` with teacher-forced token accuracy."""
        with editing_mode(self.model):
            return self._scores(record)

    def _scores(self, record: Mapping[str, Any]) -> dict[str, Any]:
        model, tok = self.model, self.tok
        prompt = _edit_request(record, 0).text
        out: dict[str, Any] = {"rewrite_acc": [token_accuracy(model, tok, prompt,
                                                              record["target_new"])]}
        if record.get("rephrase_prompt") is not None:
            out["rephrase_acc"] = [token_accuracy(model, tok, record["rephrase_prompt"],
                                                  record["target_new"])]
        out["locality"] = {
            f"{key}_output": [predicted_tokens(model, tok, x["prompt"], x["ground_truth"])[0]]
            for key, x in record.get("locality", {}).items()}
        out["portability"] = {
            f"{key}_acc": [token_accuracy(model, tok, x["prompt"], x["ground_truth"])]
            for key, x in record.get("portability", {}).items()}
        return out


def _edit_request(record: Mapping[str, Any], index: int) -> EditRequest:
    """The :class:`EditRequest` of an EasyEdit request dict (the subject must be in the
    prompt, as EasyEdit asserts)."""
    req = EditRequest(prompt=record["prompt"], subject=record["subject"],
                      target_new=record["target_new"], ground_truth=record.get("ground_truth"),
                      case_id=index)
    if "{}" not in req.prompt and subject_position(req.prompt, req.subject) < 0:
        raise RequestError(f"request {index}: subject {req.subject!r} is not in prompt "
                           f"{req.prompt!r}")
    return req


def _finish_locality(pre: Mapping[str, Any], post: dict[str, Any]) -> None:
    """EasyEdit's locality score: per prompt, the share of predicted tokens unchanged."""
    for name, before in pre["locality"].items():
        after = post["locality"][name]
        key = name[: -len("_output")] + "_acc"
        post["locality"][key] = [float(np.mean(np.equal(a, b))) if len(a) == len(b) else 0.0
                                 for a, b in zip(before, after, strict=True)]


# ----------------------------------------------------------------------------- requests

def prepare_requests(prompts: str | Sequence[str], target_new: str | Sequence[str],
                     ground_truth: Any = None, target_neg: Any = None,
                     rephrase_prompts: Any = None, locality_inputs: Any = None,
                     portability_inputs: Any = None, subject: Any = None
                     ) -> list[dict[str, Any]]:
    """EasyEdit's request dicts (``prompt``, ``target_new``, ``ground_truth``, ``subject``,
    ``rephrase_prompt``, ``locality`` / ``portability`` ``{key: {prompt, ground_truth}}``)
    from ``edit()``'s arguments; single strings stand for one request each."""
    prompts, targets = _as_list(prompts), _as_list(target_new)
    n = len(prompts)
    records: list[dict[str, Any]] = [
        {"prompt": p, "target_new": t, "ground_truth": g, "portability": {}, "locality": {}}
        for p, t, g in zip(prompts, _per_request(targets, n, "target_new"),
                           _per_request(ground_truth, n, "ground_truth"), strict=True)]
    for name, values in (("target_neg", target_neg), ("subject", subject),
                         ("rephrase_prompt", rephrase_prompts)):
        if values is not None:
            for rec, value in zip(records, _per_request(values, n, name), strict=True):
                rec[name] = value
    for section, inputs in (("locality", locality_inputs), ("portability", portability_inputs)):
        for key, spec in (inputs or {}).items():
            ps = _per_request(spec["prompt"], n, f"{section}_inputs[{key!r}]['prompt']")
            gs = _per_request(spec["ground_truth"], n,
                              f"{section}_inputs[{key!r}]['ground_truth']")
            for rec, p, g in zip(records, ps, gs, strict=True):
                if p is not None:
                    rec[section][key] = {"prompt": p, "ground_truth": g}
    return records


def _as_list(values: Any) -> list[Any]:
    return [values] if isinstance(values, str) or values is None else list(values)


def _per_request(values: Any, n: int, name: str) -> list[Any]:
    """One value per request: None for all, a string for one request, or a list of ``n``."""
    if values is None:
        return [None] * n
    out = _as_list(values)
    if len(out) != n:
        raise RequestError(f"{name}: {len(out)} value(s) for {n} prompt(s); give one per "
                           "prompt")
    return out


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def predicted_tokens(model: torch.nn.Module, tokenizer: Any, prompt: str,
                     target: str) -> tuple[list[int], list[int]]:
    """EasyEdit's teacher forcing: ``prompt + " " + target`` tokenised as one text; returns
    the model's top-1 predictions at the target's positions and the target's tokens there
    (run it in eval mode)."""
    ids = encode(tokenizer, f"{prompt} {target}")
    start = len(encode(tokenizer, prompt))
    if start >= len(ids):
        return [], []
    x = torch.tensor([ids], device=input_device(model))
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
    return logits[start - 1 : -1].argmax(-1).tolist(), ids[start:]


def token_accuracy(model: torch.nn.Module, tokenizer: Any, prompt: str, target: str) -> float:
    """Share of ``target``'s tokens the model predicts top-1 after ``prompt`` (EasyEdit's
    ``rewrite_acc`` / ``rephrase_acc`` / portability score); NaN for an empty target."""
    preds, labels = predicted_tokens(model, tokenizer, prompt, target)
    return float(np.mean(np.equal(preds, labels))) if labels else float("nan")


def summary_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Means over requests, as EasyEdit's ``summary_metrics`` prints them (no file written):
    ``{"pre"|"post": {"rewrite_acc", "rephrase_acc", "locality": {key_acc}, "portability":
    {key_acc}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for phase in ("pre", "post"):
        found: dict[str, Any] = {}
        for key in ("rewrite_acc", "rephrase_acc"):
            values = [np.mean(m[phase][key]) for m in metrics if key in m.get(phase, {})]
            if values:
                found[key] = float(np.mean(values))
        for section in ("locality", "portability"):
            per_key: dict[str, list[float]] = {}
            for m in metrics:
                for key, value in m.get(phase, {}).get(section, {}).items():
                    if key.endswith("acc"):
                        per_key.setdefault(key, []).append(float(np.mean(value)))
            if per_key:
                found[section] = {k: float(np.mean(v)) for k, v in per_key.items()}
        out[phase] = found
    return out
