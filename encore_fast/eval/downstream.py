"""Downstream tasks: the ENCORE paper's check that edits leave the model's general abilities.

Six few-shot classification tasks from ``<data>/downstream/`` (SST-2, MRPC, CoLA, RTE, NLI, MMLU;
the files shipped with the official ENCORE code). Each task: the first ``shots`` records of its
file are the few-shot examples (prompt + label word, blank line between), the next ``n`` records
are scored. The prediction is the label word with the lowest mean negative log-likelihood after
the prompt, each label word with a leading space. Reported per task: F1 (weighted over the
classes, as the paper's code), MCC and accuracy; and the mean F1 over the tasks.

Fast: the few-shot context is the same for every example of a task, so its keys and values are
computed once and shared; each example then runs one forward over its own tokens and, when every
label word is one token (all six tasks here with SmolLM2's tokenizer), all label words are read
from that one row's last logits. Multi-token label words get a row per label.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encore_fast.errors import EncoreFastError
from encore_fast.models.placement import input_device
from encore_fast.requests import encode

Record = Mapping[str, Any]


class DownstreamError(EncoreFastError, ValueError):
    """A downstream task file that is missing or holds records of another shape."""


@dataclass(frozen=True)
class TaskSpec:
    """How one task's records become a prompt and a gold label index."""

    name: str
    file: str
    labels: tuple[str, ...]  # label words, by gold index
    prompt: Callable[[Record], str]
    gold: Callable[[Record], int]


def _yes_no(label: Any) -> int:
    return int(label)  # 0 -> No, 1 -> Yes


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", "sst2.json", ("negative", "positive"),
                 lambda r: f"Review : {r['sentence']}\nSentiment :", lambda r: int(r["label"])),
        TaskSpec("mrpc", "mrpc.json", ("No", "Yes"),
                 lambda r: ("Are the sentences paraphrases of each other.\n"
                            f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
                            "Answer:"), lambda r: _yes_no(r["label"])),
        TaskSpec("cola", "cola.json", ("No", "Yes"),
                 lambda r: ("Is this sentence linguistically acceptable?\n"
                            f"Sentence: {r['sentence']}\nAnswer:"),
                 lambda r: _yes_no(r["label"])),
        TaskSpec("rte", "rte.json", ("True", "False"),  # GLUE RTE: label 1 = not entailed
                 lambda r: f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\n"
                           "answer:", lambda r: int(r["label"])),
        TaskSpec("nli", "nli.json", ("True", "False"),
                 lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? "
                           "Answer:",
                 lambda r: {"entailment": 0, "not_entailment": 1}[r["label"]]),
        TaskSpec("mmlu", "mmlu.json", ("A", "B", "C", "D"),
                 lambda r: (f"Question: {r['question']}\n"
                            + "".join(f"({c}) {t}\n" for c, t in zip("ABCD", r["choices"],
                                                                      strict=True))
                            + "Answer:"), lambda r: int(r["answer"])),
    )
}
DEFAULT_TASKS = tuple(TASKS)


@dataclass
class Task:
    """A task ready to score: its few-shot context and the examples' prompts and labels."""

    spec: TaskSpec
    context: str
    prompts: list[str]
    gold: list[int]


def load_task(name: str, folder: str | os.PathLike[str], shots: int = 3,
              n: int | None = 100) -> Task:
    """Task ``name`` from ``folder``: the first ``shots`` records as few-shot examples, the
    next ``n`` (None: all the rest) as the test examples."""
    if name not in TASKS:
        raise DownstreamError(f"unknown downstream task {name!r}; choose from {sorted(TASKS)}")
    spec = TASKS[name]
    path = Path(folder) / spec.file
    if not path.is_file():
        raise DownstreamError(f"downstream task {name}: no file {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        rows = [(spec.prompt(r), spec.gold(r)) for r in records]
    except (ValueError, KeyError, TypeError) as exc:
        raise DownstreamError(f"{path}: not a {name} task file ({type(exc).__name__}: "
                              f"{exc})") from None
    if len(rows) <= shots:
        raise DownstreamError(f"{path}: {len(rows)} records, fewer than shots + 1 = "
                              f"{shots + 1}")
    context = "".join(f"{p} {spec.labels[g]}\n\n" for p, g in rows[:shots])
    test = rows[shots:] if n is None else rows[shots : shots + n]
    return Task(spec, context, [p for p, _ in test], [g for _, g in test])


def load_tasks(folder: str | os.PathLike[str], names: Sequence[str] = DEFAULT_TASKS,
               shots: int = 3, n: int | None = 100) -> list[Task]:
    return [load_task(name, folder, shots, n) for name in names]


# --- scoring -------------------------------------------------------------------------------


@torch.no_grad()
def label_nll(model: torch.nn.Module, tokenizer: Any, context: str, prompts: Sequence[str],
              labels: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Mean NLL ``[len(prompts), len(labels)]`` of each label word (leading space) after
    ``context + prompt`` (tokenised as one text). The tokens all texts share (the context)
    are run once and their keys/values shared; the rest of each row is left-padded after them
    (explicit positions), so only the last logits of each row are made."""
    device = input_device(model)
    label_ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in labels]
    full = [encode(tokenizer, context + p) for p in prompts]  # (as the whole text tokenises)
    n_ctx = _common_prefix(full)
    ctx_ids = full[0][:n_ctx] if full else []
    prompt_ids = [ids[n_ctx:] for ids in full]
    single = all(len(ids) == 1 for ids in label_ids)
    rows: list[tuple[int, int, list[int]]] = []  # (prompt, label or -1, tokens after ctx)
    for i, ids in enumerate(prompt_ids):
        if single:
            rows.append((i, -1, ids))
        else:
            rows += [(i, j, ids + lab) for j, lab in enumerate(label_ids)]
    rows.sort(key=lambda r: len(r[2]))
    keep = 1 if single else max(len(lab) for lab in label_ids) + 1
    out = torch.zeros(len(prompts), len(labels), dtype=torch.float64)
    past = None
    cache_arg = _cache_argument(model)
    if n_ctx:
        first = model(input_ids=torch.tensor([ctx_ids], device=device), use_cache=True)
        past = getattr(first, "cache", None) or first.past_key_values
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r[2]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), n_ctx + width, dtype=torch.long)
        pos = torch.zeros(len(chunk), width, dtype=torch.long)
        mask[:, :n_ctx] = 1
        for b, (_, _, toks) in enumerate(chunk):
            pad = width - len(toks)
            ids[b, pad:] = torch.tensor(toks)
            mask[b, n_ctx + pad :] = 1
            pos[b, pad:] = torch.arange(n_ctx, n_ctx + len(toks))
        cached = {cache_arg: _repeat_cache(past, len(chunk))} if past is not None else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=pos.to(device), use_cache=True, logits_to_keep=keep,
                       **cached).logits
        logp = logits.float().log_softmax(-1).cpu()  # [B, keep, vocab]: the rows' ends
        for b, (i, j, _toks) in enumerate(chunk):
            if single:
                for k, lab in enumerate(label_ids):
                    out[i, k] = -float(logp[b, -1, lab[0]])
            else:
                lab = label_ids[j]  # position -1 - t predicts lab[len - t], -1 itself nothing
                nll = [-float(logp[b, -1 - len(lab) + t, tok]) for t, tok in enumerate(lab)]
                out[i, j] = sum(nll) / len(nll)
    return out


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence one token."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name this transformers version gives the KV-cache argument (``cache``, formerly
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")


def _repeat_cache(past: Any, n: int) -> Any:
    """A fresh copy of the shared context cache for a batch of ``n`` rows."""
    cache = copy.deepcopy(past)
    cache.batch_repeat_interleave(n)
    return cache


def predict(nll: torch.Tensor) -> list[int]:
    """The label with the lowest mean NLL per prompt (the first one on ties)."""
    return [int(i) for i in nll.argmin(dim=1)]


# --- metrics -------------------------------------------------------------------------------


def confusion(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """``m[g][p]``: examples of gold class g predicted as p."""
    m = [[0] * n_classes for _ in range(n_classes)]
    for g, p in zip(gold, pred, strict=True):
        m[g][p] += 1
    return m


def f1_weighted(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> float:
    """Per-class F1 averaged with the classes' support as weights (sklearn's "weighted");
    a class never predicted and never present counts 0 with weight 0."""
    m = confusion(gold, pred, n_classes)
    total = len(gold)
    score = 0.0
    for c in range(n_classes):
        tp = m[c][c]
        support = sum(m[c])
        predicted = sum(m[g][c] for g in range(n_classes))
        f1 = 2 * tp / (support + predicted) if support + predicted else 0.0
        score += f1 * support / total if total else 0.0
    return score


def mcc(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> float:
    """Matthews correlation coefficient (multi-class form; 0 when undefined, as sklearn)."""
    m = confusion(gold, pred, n_classes)
    s = len(gold)
    c = sum(m[k][k] for k in range(n_classes))
    t = [sum(m[k]) for k in range(n_classes)]  # true counts
    p = [sum(m[g][k] for g in range(n_classes)) for k in range(n_classes)]  # predicted
    num = c * s - sum(tk * pk for tk, pk in zip(t, p, strict=True))
    den = math.sqrt(s * s - sum(pk * pk for pk in p)) * math.sqrt(s * s - sum(tk * tk for tk in t))
    return num / den if den else 0.0


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold) if gold else 0.0


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: Task,
                  batch_size: int = 16) -> dict[str, float]:
    """F1 (weighted), MCC and accuracy of ``model`` on ``task``."""
    return task_scores(task, task_predictions(model, tokenizer, task, batch_size))


def task_predictions(model: torch.nn.Module, tokenizer: Any, task: Task,
                     batch_size: int = 16) -> list[int]:
    """The label ``model`` predicts for each of ``task``'s examples."""
    return predict(label_nll(model, tokenizer, task.context, task.prompts, task.spec.labels,
                             batch_size))


def task_scores(task: Task, pred: Sequence[int]) -> dict[str, float]:
    """F1 (weighted), MCC, accuracy and ``n`` of the predictions ``pred`` on ``task``."""
    k = len(task.spec.labels)
    return {"f1": f1_weighted(task.gold, pred, k), "mcc": mcc(task.gold, pred, k),
            "acc": accuracy(task.gold, pred), "n": len(task.gold)}


def evaluate_downstream(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[Task],
                        batch_size: int = 16) -> dict[str, Any]:
    """Every task's scores, and ``mean_f1`` over them."""
    out: dict[str, Any] = {t.spec.name: evaluate_task(model, tokenizer, t, batch_size)
                           for t in tasks}
    out["mean_f1"] = sum(v["f1"] for v in out.values()) / len(tasks) if tasks else None
    return out
