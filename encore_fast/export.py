"""The edited model as a normal transformers checkpoint, for use without encore_fast.

:func:`export_model` writes, into a new folder (atomically: a temporary folder renamed into
place): the weights as safetensors in the model's own dtype (a 16-bit model's edited matrices are
its fp32 masters rounded once, to nearest, exactly as the model holds them), ``config.json``, the
tokenizer, the generation config, a model card (``README.md``: method, settings, source model,
number of edits) and the edit list (``edits.jsonl``, one request per line).
``AutoModelForCausalLM.from_pretrained(folder)`` loads it with the edits in place.

For a model that came from a GGUF file (the bundled SmolLM2), :func:`export_gguf` also writes a
GGUF file: every tensor and metadata field of the source as it is, except the edited matrices
(``blk.N.ffn_down.weight``), rewritten from the edited weights in F16, BF16 or Q8_0 -- never in
a type that would round the edits away (the source's 4-bit types would).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encore_fast.errors import ConfigError
from encore_fast.models.loading import BUNDLED_NAMES, bundled_gguf
from encore_fast.requests import EditRequest

EDITS_FILE = "edits.jsonl"
GGUF_TYPES = ("BF16", "F16", "Q8_0")


def export_model(model: Any, tokenizer: Any, path: str | os.PathLike, *, method: str,
                 settings: dict[str, Any], source: str, requests: Sequence[EditRequest],
                 overwrite: bool = False) -> Path:
    """Write ``model`` (edited) with its tokenizer, model card and edit list to ``path``.

    ``path`` must not exist (or be empty), unless ``overwrite``: then its old content is
    replaced once the new one is complete. Returns ``path``."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not overwrite)):
        raise ConfigError(f"cannot export the model to {final}: it exists and is not an empty "
                          "folder (pass overwrite=True / --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_edits(tmp / EDITS_FILE, requests)
        card = model_card(method, settings, source, len(requests), _dtype_name(model))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def export_editor(editor: Any, path: str | os.PathLike, overwrite: bool = False,
                  gguf: str | None = None) -> Path:
    """:func:`export_model` of an :class:`~encore_fast.editor.Editor`'s model, with its method,
    settings, source model name and requests; ``gguf`` (a type of :data:`GGUF_TYPES`): also
    ``model.gguf`` in the folder, for the bundled model (the one GGUF source known here)."""
    source = bundled_gguf() if editor.model_name in BUNDLED_NAMES else None
    if gguf is not None and (gguf not in GGUF_TYPES or source is None):
        raise ConfigError(f"gguf={gguf!r}: GGUF export needs one of {GGUF_TYPES} and a GGUF "
                          f"source model (the bundled SmolLM2), not {editor.model_name!r}")
    out = export_model(editor.model, editor.tokenizer, path, method=editor.method,
                       settings=editor.hparams.to_dict(), source=editor.model_name,
                       requests=editor.requests, overwrite=overwrite)
    if gguf is not None and source is not None:
        weights = {site: editor.edited_weight(site) for site in editor.sites}
        export_gguf(source, out / "model.gguf", weights, gguf)
    return out


def export_gguf(source: Path, target: Path, weights: dict[Any, Any], kind: str = "BF16") -> Path:
    """``source`` (a Llama-family GGUF file) with the MLP matrices of ``weights`` (site -> edited
    weight: a layer's down projection, or ``"mlp_gate.L"`` / ``"mlp_up.L"``) replaced, in
    ``kind``; written atomically."""
    import gguf  # (optional dependency: the ``bundled`` extra)

    reader = gguf.GGUFReader(source)
    qtype = gguf.GGMLQuantizationType[kind]
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch=str(reader.fields["general.architecture"].contents()))
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
        edited = {gguf_name(site): w for site, w in weights.items()}
        for t in reader.tensors:
            if t.name in edited:
                data = gguf.quants.quantize(edited.pop(t.name).detach().float().cpu().numpy(),
                                            qtype)
                writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
            else:
                writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        if edited:
            raise ConfigError(f"{source}: no tensors {sorted(edited)} to replace")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def model_card(method: str, settings: dict[str, Any], source: str, n_edits: int,
               dtype: str) -> str:
    """The checkpoint's README: what was edited, how, from which model."""
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    return (f"# {source}, edited with encore_fast ({method})\n\n"
            f"- source model: `{source}`\n- method: `{method}`\n- edits: {n_edits} "
            f"(listed in `{EDITS_FILE}`)\n- weights: {dtype}\n- exported: {date}\n\n"
            "Settings:\n\n```json\n" + json.dumps(settings, indent=2, sort_keys=True) +
            "\n```\n\nLoad it with `transformers.AutoModelForCausalLM.from_pretrained` like "
            "any checkpoint; the edits are in the weights.\n")


def _write_edits(path: Path, requests: Sequence[EditRequest]) -> None:
    lines = [json.dumps(r.to_dict(), ensure_ascii=False, sort_keys=True) for r in requests]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _dtype_name(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _replace(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final`` (an old folder there goes only after)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def gguf_name(site: Any) -> str:
    """The GGUF tensor of an edited site (Llama layout: ``blk.L.ffn_down/gate/up.weight``)."""
    if isinstance(site, int):
        return f"blk.{site}.ffn_down.weight"
    name, _, layer = str(site).rpartition(".")
    kinds = {"mlp_gate": "ffn_gate", "mlp_up": "ffn_up"}
    if name not in kinds:
        raise ConfigError(f"GGUF export: no GGUF tensor is known for edited site {site!r}")
    return f"blk.{layer}.{kinds[name]}.weight"
