"""Tiny scripted stand-ins for a tokenizer, a causal LM and an editor, for fast exact tests.

The LM's next-token distribution depends only on the current token (a lookup table), so every
probability a metric reads can be written down by hand.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from encore_fast.batch_report import BatchReport
from encore_fast.models.fingerprint import model_fingerprint

_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Word-level tokenizer: words and punctuation are tokens, whitespace is dropped.

    Ids 0-3 are ``<pad> <bos> <eos> <unk>``; ``bos=False`` behaves like GPT-2 (no BOS added).
    """

    def __init__(self, words: Sequence[str], bos: bool = True):
        self.vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + [w for w in words]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id = 0
        self.bos_token_id = 1 if bos else None
        self.eos_token_id = 2
        self.is_fast = False

    def __len__(self) -> int:
        return len(self.vocab)

    def id(self, word: str) -> int:
        """Id of one word (KeyError for words outside the vocabulary)."""
        return self.ids[word]

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list]:
        ids = [self.ids.get(w, 3) for w in _WORD.findall(text)]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        words = [self.vocab[int(i)] for i in ids]
        if skip_special_tokens:
            words = [w for w in words if w not in ("<pad>", "<bos>", "<eos>")]
        return " ".join(words)


class LookupLM(torch.nn.Module):
    """Causal LM whose logits at position t are ``table[input_ids[t]]`` (uniform by default).

    Counts forward calls in ``calls`` so tests can check batching.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab_size, vocab_size), requires_grad=False)
        self.calls = 0

    def set_next(self, token: int, probs: Mapping[int, float]) -> None:
        """After ``token``, the given probabilities; the remaining mass spread evenly."""
        vocab = self.table.shape[0]
        rest = 1.0 - sum(probs.values())
        others = vocab - len(probs)
        if rest < -1e-12 or (others == 0 and abs(rest) > 1e-12):
            raise ValueError("probabilities must sum to at most 1")
        row = torch.full((vocab,), math.log(max(rest, 1e-30) / max(others, 1)))
        for tok, p in probs.items():
            row[tok] = math.log(p)
        self.table.data[token] = row

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, **_: Any) -> Any:
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


FakeReport = BatchReport  # (the editor's own report type)


class FakeEditor:
    """Follows the Editor's contract without editing anything: it records its batches.

    ``log`` (shared between instances) receives the case ids of every batch ``edit`` applies;
    ``fail_at=k`` makes the call that would apply batch k raise ``RuntimeError``. Norms grow
    by 1% per edit: ``||W_l|| = l * (1 + 0.01 * edits)``. Saved edits are a JSON file.
    """

    method = "fake"

    def __init__(
        self,
        log: list | None = None,
        fail_at: int | None = None,
        words: Sequence[str] = ("x",),
    ):
        self.tokenizer = WordTokenizer(list(words))
        self.model = LookupLM(len(self.tokenizer))
        self.hparams = SimpleNamespace(layers=[1, 2])
        self.view = SimpleNamespace(weight=lambda layer: self.model.table)  # (for snapshots)
        self.fingerprint = model_fingerprint(self.model)
        self.log = log if log is not None else []
        self.fail_at = fail_at
        self.batches: list[list] = []

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def num_edits(self) -> int:
        return sum(len(b) for b in self.batches)

    def weight_norms(self) -> dict[int, float]:
        return {layer: layer * (1 + 0.01 * self.num_edits) for layer in self.hparams.layers}

    def edit(
        self, requests: Sequence[Any], batch_size: int | None = None, progress: bool = True
    ) -> list[FakeReport]:
        if self.fail_at is not None and self.num_batches == self.fail_at:
            raise RuntimeError(f"interrupted before batch {self.fail_at}")
        ids = [r.case_id for r in requests]
        self.batches.append(ids)
        self.log.append(ids)
        norms = self.weight_norms()
        return [
            FakeReport(
                self.num_batches - 1,
                len(ids),
                0.01 * len(ids),
                [3] * len(ids),
                [True] * len(ids),
                norms,
                {k: 0.1 for k in norms},
            )
        ]

    def save_edits(self, path: Any, metadata: Any = None) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"batches": self.batches, "extra": dict(metadata or {})}, fh)

    @staticmethod
    def read_metadata(path: Any) -> dict:
        with open(path, encoding="utf-8") as fh:
            return dict(json.load(fh)["extra"])

    def load_edits(self, path: Any) -> None:
        if self.batches:
            raise RuntimeError("load_edits needs an unedited editor")
        with open(path, encoding="utf-8") as fh:
            self.batches = json.load(fh)["batches"]
