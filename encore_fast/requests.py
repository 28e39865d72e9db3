"""Edit requests: the request type, validation, and where the subject sits in the tokens.

A request rewrites one fact: ``prompt`` (a ``{}`` template, or plain text that contains the
subject), ``subject`` and ``target_new``. Everything that can be wrong with a request is checked
here, before any weight changes, and reported with the request it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from encore_fast.errors import RequestError


@dataclass(frozen=True)
class EditRequest:
    """One fact rewrite: ``prompt`` + ``subject`` -> ``target_new``.

    ``prompt`` is either a template with ``{}`` where the subject goes, or plain text that
    contains ``subject`` (its first occurrence is the one edited). ``target_new`` is the text the
    model should continue with; a leading space is added when it has none (the convention of the
    published code, right for BPE tokenizers that mark word starts).
    """

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    case_id: int | str | None = None
    chat: bool = False  # edited (and asked) inside the tokenizer's chat template

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                tag = "request" if self.case_id is None else f"request (case {self.case_id})"
                raise RequestError(f"{tag}: field {name!r} must be a string, got "
                                   f"{type(value).__name__} {value!r}")
        if not isinstance(self.chat, bool):
            raise RequestError(f"request field 'chat' must be true or false, got {self.chat!r}")
        if self.ground_truth is not None and not isinstance(self.ground_truth, str):
            raise RequestError(f"request field 'ground_truth' must be a string or None, got "
                               f"{type(self.ground_truth).__name__}")

    @property
    def template(self) -> str:
        """The prompt as a ``{}`` template: the subject's first occurrence as a whole word (not
        inside a longer word, e.g. "Paris" in "Parisians") replaced by ``{}``."""
        if "{}" in self.prompt:
            return self.prompt
        pos = subject_position(self.prompt, self.subject)
        if pos < 0:
            return self.prompt
        return self.prompt[:pos] + "{}" + self.prompt[pos + len(self.subject) :]

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace("{}", self.subject, 1)

    @property
    def target_text(self) -> str:
        """The target as it is appended to the prompt (with a leading space)."""
        return target_with_space(self.target_new)

    def describe(self) -> str:
        """A short label for error messages and logs."""
        tag = f"case {self.case_id}" if self.case_id is not None else "request"
        return f"{tag} ({self.text!r} -> {self.target_new!r})"

    def to_dict(self) -> dict[str, Any]:
        """The request's fields (``chat`` only when true: plain requests read as before)."""
        d = asdict(self)
        if not d["chat"]:
            del d["chat"]
        return d

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EditRequest:
        """Build a request from a dict in our layout, EasyEdit's or ROME's ``requested_rewrite``."""
        rec: Mapping[str, Any] = record
        case_id = record.get("case_id")
        if "requested_rewrite" in record:
            rec = record["requested_rewrite"]
        try:
            prompt = rec["prompt"]
            subject = rec["subject"]
            target = rec.get("target_new")
            if target is None:
                raise KeyError("target_new")
        except KeyError as exc:
            raise RequestError(f"record {dict(record)!r}: missing field {exc}") from None
        truth = rec.get("ground_truth", rec.get("target_true"))
        case_id = case_id if case_id is not None else rec.get("case_id")
        label = f"record (case {case_id})" if case_id is not None else "record"
        for name, value in (("prompt", prompt), ("subject", subject)):
            if not isinstance(value, str):
                raise RequestError(f"{label}: field {name!r} must be a string, got "
                                   f"{type(value).__name__} {value!r}")
        return cls(
            prompt=prompt,
            subject=subject,
            target_new=_unwrap(target, "target_new", label),
            ground_truth=None if truth is None else _unwrap(truth, "ground_truth", label),
            case_id=case_id,
            chat=record.get("chat", rec.get("chat", False)),
        )


def _unwrap(value: Any, name: str, label: str) -> str:
    """ROME stores targets as ``{"str": ..., "id": ...}``; accept both that and plain strings."""
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str):
        raise RequestError(f"{label}: field {name!r} must be a string (or {{'str': ...}}), got "
                           f"{type(value).__name__} {value!r}")
    return value


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def subject_position(text: str, subject: str) -> int:
    """Index of the first occurrence of ``subject`` in ``text`` that is not part of a longer
    word (where the subject starts/ends with a letter or digit, the character before/after it
    is not one); -1 if there is none."""
    if not subject:
        return -1
    pos = text.find(subject)
    while pos >= 0:
        end = pos + len(subject)
        left_ok = pos == 0 or not (_is_word_char(subject[0]) and _is_word_char(text[pos - 1]))
        right_ok = end == len(text) or not (_is_word_char(subject[-1])
                                            and _is_word_char(text[end]))
        if left_ok and right_ok:
            return pos
        pos = text.find(subject, pos + 1)
    return -1


def target_with_space(target: str) -> str:
    """Prefix a space unless the target already starts with whitespace."""
    return target if target[:1].isspace() else " " + target


def as_requests(items: Iterable[EditRequest | Mapping[str, Any]] | EditRequest | Mapping[str, Any],
                chat: bool = False) -> list[EditRequest]:
    """Requests, or dicts in any supported layout, as a list of requests; one request or one
    dict alone is taken as a list of one. Anything else is a :class:`RequestError` naming it.
    ``chat``: every request inside the chat template (else as each one says)."""
    if isinstance(items, (EditRequest, Mapping)):
        items = [items]
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise RequestError(f"requests must be EditRequest objects or dicts (or a list of them), "
                           f"got {type(items).__name__} {str(items)[:60]!r}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, EditRequest):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(EditRequest.from_dict(item))
        else:
            raise RequestError(f"request #{i} is a {type(item).__name__} "
                               f"({str(item)[:60]!r}), not an EditRequest or a dict")
    return [replace(r, chat=True) for r in out] if chat else out


def encode(tokenizer: Any, text: str, chat: bool = False) -> list[int]:
    """Token ids of ``text`` as the model sees it at the start of a sequence (with BOS if any;
    ``chat``: a text already in the chat template, which carries its own special tokens)."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def target_token_ids(tokenizer: Any, target: str, chat: bool = False) -> list[int]:
    """Token ids of a continuation (no BOS/special tokens), with the leading-space convention;
    ``chat``: the start of the assistant's turn, as written (no space added)."""
    text = target if chat else target_with_space(target)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_USER = "\x00user-turn\x00"


def chat_template(tokenizer: Any, template: str) -> str:
    """``template`` (text, or a ``{}`` template) as the user's turn of the tokenizer's chat
    template, followed by what opens the assistant's turn (``add_generation_prompt``), with the
    template's default system prompt if it has one. A :class:`RequestError` for a tokenizer
    without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("a request asks for the chat template (chat=True), and this "
                           "tokenizer has none: edit plain prompts, or use an instruct model's "
                           "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _USER}],
                                         add_generation_prompt=True, tokenize=False)
    before, _, after = text.partition(_USER)
    if "{}" in before + after:
        raise RequestError("this tokenizer's chat template writes '{}' itself: it cannot "
                           "hold a subject placeholder")
    return before + template + after


def prompt_ids(tokenizer: Any, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt as the model is asked it: plain (with BOS), or as the user's turn
    of the chat template (``chat``), up to where the assistant's answer starts."""
    return encode(tokenizer, chat_template(tokenizer, text), True) if chat else encode(
        tokenizer, text)


def subject_last_index(tokenizer: Any, template: str, subject: str, chat: bool = False) -> int:
    """Index of the last subject token in ``template.format(subject)`` tokenised with BOS
    (``chat``: a template already in the chat template, tokenised as :func:`encode` does).

    Uses the tokenizer's character offsets when it has them (robust to merges across the
    subject's end); otherwise tokenises the text up to the end of the subject, as the
    published MEMIT code does.
    """
    if "{}" not in template:
        raise RequestError(f"template {template!r} has no '{{}}' for subject {subject!r}")
    prefix = template[: template.index("{}")]
    text = template.replace("{}", subject, 1)
    end_char = len(prefix) + len(subject)  # exclusive
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat)
        last = -1
        for i, (start, stop) in enumerate(enc["offset_mapping"]):
            if stop > start and start < end_char:
                last = i
        if last >= 0:
            return last
    return len(encode(tokenizer, prefix + subject, chat)) - 1


def validate_requests(
    requests: Sequence[EditRequest], tokenizer: Any, max_length: int | None = None,
    batch_size: int | None = None,
) -> None:
    """Raise :class:`RequestError` for the first unusable request; change nothing.

    Checks: types, non-empty subject and target, the subject is in the prompt as a whole word,
    the longest prompt the editor builds (context prefix + prompt + target) fits
    ``max_length`` tokens, and, within each batch of ``batch_size`` (default: all), no request
    twice and no two different targets for the same prompt and subject.
    """
    for i, req in enumerate(requests):
        if not isinstance(req, EditRequest):
            raise RequestError(f"request #{i}: expected an EditRequest, got {type(req).__name__}")
        label = f"request #{i} {req.describe()}"
        if not req.subject or not req.subject.strip():
            raise RequestError(f"{label}: the subject is empty")
        if not req.target_new or not req.target_new.strip():
            raise RequestError(f"{label}: the target is empty")
        if req.prompt.count("{}") > 1:
            raise RequestError(f"{label}: the prompt has more than one '{{}}' placeholder")
        if "{}" not in req.prompt:
            if req.subject not in req.prompt:
                raise RequestError(f"{label}: the subject {req.subject!r} is not in the prompt")
            if subject_position(req.prompt, req.subject) < 0:
                raise RequestError(
                    f"{label}: the subject {req.subject!r} occurs in the prompt only inside a "
                    "longer word; write the prompt as a template with '{}' where the subject "
                    "goes")
        if tokenizer is not None and (req.chat or max_length is not None):
            try:  # (a chat request of a tokenizer without a template: refused here)
                ids = prompt_ids(tokenizer, req.text, req.chat)
            except RequestError as exc:
                raise RequestError(f"{label}: {exc}") from None
            n = len(ids) + len(target_token_ids(tokenizer, req.target_new, req.chat))
            if max_length is not None and n > max_length:
                raise RequestError(
                    f"{label}: prompt + target is {n} tokens, longer than the "
                    f"{max_length} the editor allows for this model"
                )
    step = batch_size or max(1, len(requests))
    for start in range(0, len(requests), step):
        seen: dict[tuple[str, str, bool], tuple[int, str]] = {}
        for i in range(start, min(start + step, len(requests))):
            req = requests[i]
            key = (req.text, req.subject, req.chat)
            if key in seen:
                j, target = seen[key]
                what = ("repeats" if target.strip() == req.target_new.strip()
                        else f"gives another target than ({target!r})")
                raise RequestError(
                    f"request #{i} {req.describe()} {what} request #{j} for the same prompt "
                    "and subject in one batch; drop one of them (a later batch may re-edit "
                    "the fact)")
            seen[key] = (i, req.target_new)


def read_requests_file(path: str | os.PathLike) -> list[EditRequest]:
    """Requests from a JSON list (or one JSON object) or a JSON-lines file (``.jsonl``, or any
    file that is not one JSON document). Errors (:class:`RequestError`) name the file and the
    line (JSONL: 1-based, blank lines counted) or the index (JSON list) of the bad record; an
    empty file is an error too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark is dropped)
    except OSError as exc:
        raise RequestError(f"cannot read requests from {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RequestError(f"{path} is not a UTF-8 text file") from None
    lines = text.split("\n")  # (not splitlines: JSON strings may hold U+2028 and the like)
    records: list[tuple[str, Any]] | None = None
    if path.suffix != ".jsonl" and text.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            first = next((line for line in lines if line.strip()), "")
            if text.lstrip().startswith("[") or not _is_json(first):
                raise RequestError(f"{path}: not valid JSON ({exc})") from None
            # its first line is a JSON document of its own: read the file as JSON lines
        else:
            items = data if isinstance(data, list) else [data]
            records = [(f"record #{i}", r) for i, r in enumerate(items)]
    if records is None:
        records = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RequestError(f"{path} line {n}: not valid JSON ({exc.msg}, column "
                                   f"{exc.colno})") from None
    if not records:
        raise RequestError(f"{path} holds no requests")
    out = []
    for where, record in records:
        if not isinstance(record, Mapping):
            raise RequestError(f"{path} {where}: expected an object with prompt, subject and "
                               f"target_new, got {type(record).__name__}")
        if not isinstance(record.get("requested_rewrite", {}), Mapping):
            raise RequestError(f"{path} {where}: requested_rewrite must be an object, got "
                               f"{type(record['requested_rewrite']).__name__}")
        try:
            out.append(EditRequest.from_dict(record))
        except RequestError as exc:
            raise RequestError(f"{path} {where}: {exc}") from None
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
