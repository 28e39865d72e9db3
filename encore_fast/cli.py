"""The ``encore-fast`` console command: ``demo``, ``edit`` and ``eval``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from encore_fast.requests import EditRequest, RequestError

DEMO_EDITS = [
    EditRequest("The capital of {} is", "France", "Rome", ground_truth="Paris", case_id="demo-0"),
    EditRequest("{} is a famous basketball player who plays for the", "LeBron James", "Arsenal",
                case_id="demo-1"),
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "London",
                ground_truth="Paris", case_id="demo-2"),
    EditRequest("The mother tongue of {} is", "Barack Obama", "French", ground_truth="English",
                case_id="demo-3"),
    EditRequest("{} was developed by", "Windows 95", "Apple", ground_truth="Microsoft",
                case_id="demo-4"),
]
DEMO_CHECKS = [
    ("paraphrase", "The capital city of France is"),
    ("unrelated", "The capital of Germany is"),
    ("unrelated", "The mother tongue of Angela Merkel is"),
    ("unrelated", "The Statue of Liberty is located in the city of"),
]


@torch.no_grad()
def complete(model: torch.nn.Module, tokenizer: Any, prompt: str, n_tokens: int = 4) -> str:
    """Greedy continuation of ``prompt`` (a few tokens), for showing what the model says."""
    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**ids, max_new_tokens=n_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """Edit a handful of facts in the bundled model and show predictions before and after."""
    from encore_fast.editor import Editor

    print(f"Loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", flush=True)
    editor = Editor.from_pretrained(args.model, args.method, engine=args.engine,
                                    **_parse_overrides(args.overrides))
    model, tok = editor.model, editor.tokenizer
    rows = [(f"edit -> {r.target_new}", r.text) for r in DEMO_EDITS] + DEMO_CHECKS
    before = [complete(model, tok, p) for _, p in rows]
    print(f"Editing {len(DEMO_EDITS)} facts with {editor.method} ({editor.engine} engine, "
          f"layers {editor.hparams.layers}) ...", flush=True)
    t0 = time.perf_counter()
    (report,) = editor.edit(DEMO_EDITS, batch_size=len(DEMO_EDITS))
    seconds = time.perf_counter() - t0
    after = [complete(model, tok, p) for _, p in rows]
    width = max(len(p) for _, p in rows)
    print(f"\n{'prompt':<{width}}  {'before':<18} {'after':<18} kind")
    for (kind, prompt), b, a in zip(rows, before, after, strict=True):
        print(f"{prompt:<{width}}  {b.strip()[:18]!s:<18} {a.strip()[:18]!s:<18} {kind}")
    print(f"\n{report.n_requests} edits in {seconds:.1f} s (values {report.seconds_values:.1f} s, "
          f"update {report.seconds_update:.1f} s); value steps {report.steps}, "
          f"MPES stopped {sum(report.mpes_stopped)}/{report.n_requests}")
    for layer in editor.hparams.layers:
        print(f"  layer {layer}: ||W|| {report.weight_norms[layer]:.2f}, "
              f"||Δ|| {report.delta_norms[layer]:.3f}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Apply a JSON/JSONL file of requests to a model and save the edits."""
    from encore_fast.editor import Editor, edit_requests_from_json

    try:
        requests = edit_requests_from_json(args.requests)
    except (OSError, ValueError, RequestError) as exc:
        print(f"error: cannot read requests from {args.requests}: {exc}", file=sys.stderr)
        return 2
    editor = Editor.from_pretrained(args.model, args.method, preset=args.preset or "auto",
                                    engine=args.engine, corpus=args.corpus,
                                    **_parse_overrides(args.overrides))
    try:
        reports = editor.edit(requests, batch_size=args.batch_size)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = editor.save_edits(args.out)
    total = sum(r.seconds for r in reports)
    print(f"{len(requests)} edits in {len(reports)} batch(es), {total:.1f} s "
          f"({total / len(requests):.2f} s/edit); saved to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encore-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, with_method: bool = True) -> None:
        p.add_argument("--model", default=None, help="HF name or path (default: bundled)")
        if with_method:
            p.add_argument("--method", default="encore",
                           choices=("encore", "memit", "memit-seq", "alphaedit"))
        p.add_argument("--engine", default="fast", choices=("fast", "reference"))
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="setting override (JSON value); repeatable")

    demo = sub.add_parser("demo", help="edit facts in the bundled model, before/after")
    model_args(demo)
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", help="apply a JSON/JSONL file of requests, save the edits")
    edit.add_argument("requests", help="JSON list or JSONL of {prompt, subject, target_new}")
    edit.add_argument("--out", default="edits.safetensors", help="where to save the edits")
    edit.add_argument("--batch-size", type=int, default=None)
    edit.add_argument("--preset", default=None)
    edit.add_argument("--corpus", default=None, help="text for C0 (file, or dataset name)")
    model_args(edit)
    edit.set_defaults(func=cmd_edit)

    from encore_fast.eval.cli import add_eval_arguments, run_eval

    ev = sub.add_parser("eval", help="sequential editing run with evaluation")
    add_eval_arguments(ev)
    ev.set_defaults(func=run_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
