"""Evaluation data sets: CounterFact (ROME's and EasyEdit's layouts) and zsRE (MEND's layout).

Every loader returns :class:`EvalRecord` s: the edit request plus the prompts the metrics read.
Records that cannot be used are reported with their index in the file, never dropped
silently: ``on_error="raise"`` (default) raises :class:`DatasetError` listing them all,
``on_error="warn"`` warns with the same list and skips them.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from encore_fast.data import REGISTRY, DataError, locate
from encore_fast.errors import EncoreFastError
from encore_fast.paths import default_data_dir as default_data_dir
from encore_fast.requests import EditRequest, validate_requests

Layout = Literal["auto", "counterfact-rome", "counterfact-easyedit", "zsre"]
LAYOUTS = ("counterfact-rome", "counterfact-easyedit", "zsre")

# Where the first two names load_dataset knew are downloaded from; every name, with its
# checksum and licence, is in encore_fast.data.REGISTRY (``encore-fast data list``).
PUBLIC_URLS = {name: REGISTRY[name].url for name in ("counterfact", "zsre")}


class DatasetError(EncoreFastError, ValueError):
    """A data set that cannot be read, or records that cannot be used (listed by index)."""


@dataclass(frozen=True)
class EvalRecord:
    """One edit with its evaluation prompts.

    ``kind`` is ``"counterfact"`` or ``"zsre"`` (it picks the metrics). ``neighborhood_answer``
    is the answer the neighbourhood prompts should keep: CounterFact's true object (EasyEdit's
    ``locality_ground_truth``), or zsRE's ``loc_ans``. ``index`` is the position in the file.
    """

    request: EditRequest
    kind: str
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answer: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    index: int = 0


def load_dataset(
    source: str | os.PathLike[str],
    layout: Layout = "auto",
    on_error: Literal["raise", "warn"] = "raise",
    limit: int | None = None,
    timeout: float = 30.0,
) -> list[EvalRecord]:
    """Load records from a ``.json`` list, a ``.jsonl`` file, an http(s) URL, or a data set's
    name in ``encore_fast.data.REGISTRY`` (``"counterfact"``, ``"counterfact-edit"``,
    ``"zsre"``, ...: a local copy, else the cached one, else downloaded and checked once).
    ``layout="auto"`` detects the layout from the records' keys; ``limit`` keeps the first
    records of the file (before validation)."""
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', not {on_error!r}")
    text, name = _read_source(source, timeout)
    raw = _parse(text, name)
    if limit is not None:
        raw = raw[:limit]
    return parse_records(raw, layout=layout, on_error=on_error, source=name)


def parse_records(
    raw: Sequence[Any],
    layout: Layout = "auto",
    on_error: Literal["raise", "warn"] = "raise",
    source: str = "data",
) -> list[EvalRecord]:
    """Turn already-parsed dicts into records (see :func:`load_dataset`)."""
    if layout == "auto":
        layout = detect_layout(raw, source)
    elif layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    convert = _CONVERTERS[layout]
    records, problems = [], []
    for i, item in enumerate(raw):
        try:
            if not isinstance(item, Mapping):
                raise DatasetError(f"expected an object, got {type(item).__name__}")
            record = convert(item, i)
            validate_requests([record.request], None)
            records.append(record)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append((i, _reason(exc)))
    if problems:
        listing = "; ".join(f"#{i}: {why}" for i, why in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        msg = (
            f"{source}: {len(problems)} malformed {layout} record(s) at index "
            f"{[i for i, _ in problems][:50]}: {listing}{more}"
        )
        if on_error == "raise":
            raise DatasetError(msg)
        warnings.warn(msg + " -- skipped", stacklevel=2)
    return records


def detect_layout(raw: Sequence[Any], source: str = "data") -> str:
    """Guess the layout from the first object record's keys."""
    first = next((r for r in raw if isinstance(r, Mapping)), None)
    if first is None:
        raise DatasetError(f"{source}: no records (expected a list of objects)")
    if "requested_rewrite" in first:
        return "counterfact-rome"
    if "src" in first and "alt" in first:
        return "zsre"
    if "prompt" in first and "target_new" in first:
        return "counterfact-easyedit"
    raise DatasetError(
        f"{source}: cannot tell the layout from the keys {sorted(first)}; "
        f"pass layout= one of {', '.join(LAYOUTS)}"
    )


# --- reading -------------------------------------------------------------------------------


def _read_source(source: str | os.PathLike[str], timeout: float) -> tuple[str, str]:
    src = os.fspath(source)
    if src in REGISTRY:
        try:
            src = os.fspath(locate(src, timeout=timeout))
        except DataError as exc:
            raise DatasetError(str(exc)) from None
    if src.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(src, timeout=timeout) as resp:
                return resp.read().decode("utf-8"), src
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetError(
                f"could not download {src} ({exc}); without network access, download the "
                "file elsewhere and pass its local path"
            ) from None
    path = Path(src)
    if not path.is_file():
        raise DatasetError(f"no data set file at {path}")
    return path.read_text(encoding="utf-8"), str(path)


def _parse(text: str, name: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}: invalid JSON ({exc})") from None
        return list(data)
    records, bad = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            bad.append(f"line {line_no}: {exc.msg}")
    if bad:
        raise DatasetError(f"{name}: invalid JSON lines: {'; '.join(bad[:20])}")
    if not records:
        raise DatasetError(f"{name}: empty data set")
    return records


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc)


# --- the three layouts ---------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    """A non-empty string; ROME's ``{"str": ...}`` and one-element lists are unwrapped."""
    if isinstance(value, Mapping) and "str" in value:
        value = value["str"]
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _texts(value: Any, what: str) -> list[str]:
    """A list of prompts (a single string is a list of one); ``{"prompt": ...}`` unwrapped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str | Mapping) else value
    if not isinstance(items, list):
        raise DatasetError(f"{what} must be a string or a list of strings")
    out = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("prompt")
        out.append(_text(item, what))
    return out


def _from_rome(rec: Mapping[str, Any], i: int) -> EvalRecord:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, Mapping):
        raise DatasetError("requested_rewrite must be an object")
    request = EditRequest(
        prompt=_text(rw["prompt"], "requested_rewrite.prompt"),
        subject=_text(rw["subject"], "requested_rewrite.subject"),
        target_new=_text(rw["target_new"], "requested_rewrite.target_new"),
        ground_truth=_text(rw["target_true"], "requested_rewrite.target_true"),
        case_id=rec.get("case_id", i),
    )
    return EvalRecord(
        request=request,
        kind="counterfact",
        paraphrase_prompts=_texts(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_texts(rec.get("neighborhood_prompts"), "neighborhood_prompts"),
        neighborhood_answer=request.ground_truth,
        generation_prompts=_texts(rec.get("generation_prompts"), "generation_prompts"),
        index=i,
    )


def _from_easyedit(rec: Mapping[str, Any], i: int) -> EvalRecord:
    truth = _text(rec["ground_truth"], "ground_truth")
    request = EditRequest(
        prompt=_text(rec["prompt"], "prompt"),
        subject=_text(rec["subject"], "subject"),
        target_new=_text(rec["target_new"], "target_new"),
        ground_truth=truth,
        case_id=rec.get("case_id", i),
    )
    loc = _texts(rec.get("locality_prompt"), "locality_prompt")
    answer = rec.get("locality_ground_truth")
    return EvalRecord(
        request=request,
        kind="counterfact",
        paraphrase_prompts=_texts(rec.get("rephrase_prompt"), "rephrase_prompt"),
        neighborhood_prompts=loc,
        neighborhood_answer=truth if answer is None else _text(answer, "locality_ground_truth"),
        generation_prompts=_texts(rec.get("generation_prompts"), "generation_prompts"),
        index=i,
    )


def _from_zsre(rec: Mapping[str, Any], i: int) -> EvalRecord:
    answers = rec["answers"]
    if not isinstance(answers, list) or not answers:
        raise DatasetError("answers must be a non-empty list")
    request = EditRequest(
        prompt=_text(rec["src"], "src"),
        subject=_text(rec["subject"], "subject"),
        target_new=_text(rec["alt"], "alt"),
        ground_truth=_text(answers[0], "answers[0]"),
        case_id=rec.get("case_id", i),
    )
    loc = _text(rec["loc"], "loc")
    # MEMIT's zsRE evaluation asks the NQ question with a trailing "?".
    loc = loc if loc.rstrip().endswith("?") else loc + "?"
    return EvalRecord(
        request=request,
        kind="zsre",
        paraphrase_prompts=_texts(rec.get("rephrase"), "rephrase"),
        neighborhood_prompts=[loc],
        neighborhood_answer=_text(rec["loc_ans"], "loc_ans"),
        index=i,
    )


_CONVERTERS = {
    "counterfact-rome": _from_rome,
    "counterfact-easyedit": _from_easyedit,
    "zsre": _from_zsre,
}
