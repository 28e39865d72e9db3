"""The ``encore-fast`` console command: ``demo``, ``edit`` and ``eval``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from encore_fast.config import EditConfig, parse_overrides
from encore_fast.distributed import init_from_env
from encore_fast.errors import ConfigError, EncoreFastError
from encore_fast.eval.cli import positive_int
from encore_fast.eval.datasets import DatasetError
from encore_fast.eval.run import RunConfigError
from encore_fast.models.dtypes import DTYPES
from encore_fast.models.loading import pad_id
from encore_fast.requests import EditRequest

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
                         pad_token_id=pad_id(tokenizer))
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)




def check_settings(model: str | None, method: str, preset: str | None,
                   overrides: dict[str, Any]) -> EditConfig:
    """Refuse unknown or bad settings before a model is loaded (ConfigError); the layers are
    checked against the model's depth once it is loaded. Returns the settings (as far as they
    are known without the model)."""
    from encore_fast.config import guess_preset, make_config

    if preset == "auto":
        preset = guess_preset("smollm2-135m" if model is None else str(model))
    return make_config(method, preset, None, **overrides)


def _looks_like_path(text: str) -> bool:
    """A local path rather than a hub name (``owner/name``) or a dataset name."""
    return (text.startswith(("/", "./", "../", "~")) or text in (".", "..") or "\\" in text
            or text.count("/") >= 2)


def check_model(model: str | None) -> None:
    """Refuse a ``--model`` path that does not exist or holds no saved model, before loading.
    Hub names are left to the loader (its errors are OSErrors, reported in one line)."""
    from encore_fast.models.loading import BUNDLED_NAMES

    if model is None or model.lower() in BUNDLED_NAMES:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {model}: the folder holds no saved model "
                              "(no config.json)")
    elif path.exists():
        raise ConfigError(f"--model {model}: a file, not a model folder or hub name")
    elif _looks_like_path(model):
        raise ConfigError(f"--model {model}: no such folder")


def check_corpus(corpus: str | None, n_samples: int) -> None:
    """Refuse a ``--corpus`` that is missing or unreadable before a model is loaded: a file is
    read now (the texts the statistics will use), a dataset name needs ``datasets``."""
    import importlib.util

    from encore_fast.stats import load_corpus

    if corpus is None:
        return
    path = Path(corpus)
    if path.is_dir():
        raise ConfigError(f"--corpus {corpus}: a folder, not a text file")
    if path.exists():
        try:
            load_corpus(corpus, n_samples)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # (a malformed .json/.jsonl corpus, records without text, a non-UTF-8 file)
            raise ConfigError(f"--corpus {corpus}: cannot read texts from it "
                              f"({type(exc).__name__}: {exc})") from None
    elif _looks_like_path(corpus) or path.suffix in (".txt", ".json", ".jsonl"):
        raise ConfigError(f"--corpus {corpus}: no such file")
    elif importlib.util.find_spec("datasets") is None:
        raise ConfigError(f"--corpus {corpus}: no such file, and reading a Hugging Face data "
                          "set by name needs the 'datasets' package, which is not installed")


def check_out_file(path: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless asked to, or to write where no file
    can be made."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path}: a folder, not a file")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {path} exists; pass --overwrite to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {path}: {parent} is not a folder")


USER_ERRORS = (EncoreFastError, DatasetError, RunConfigError, OSError)
"""What a user's mistake raises (bad input, setting, file, or run folder); anything else is a
bug and keeps its traceback."""


def error_line(command: str, exc: BaseException) -> str:
    """``encore-fast <command>: error: <message>``, on one line."""
    return f"encore-fast {command}: error: {_one_line(exc)}"


def cmd_demo(args: argparse.Namespace) -> int:
    """Edit a handful of facts in the bundled model and show predictions before and after."""
    from encore_fast.editor import Editor

    overrides = parse_overrides(args.overrides)
    check_settings(args.model, args.method, "auto", overrides)
    check_model(args.model)
    print(f"Loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", flush=True)
    editor = Editor.from_pretrained(args.model, args.method, engine=args.engine,
                                    dtype=DTYPES[args.dtype], **overrides)
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
    from encore_fast.editor import Editor
    from encore_fast.requests import read_requests_file, validate_requests

    # Everything that can be checked without the model is checked first: nothing is loaded
    # or written for a mistake in the requests, the settings, the paths.
    requests = read_requests_file(args.requests)
    overrides = parse_overrides(args.overrides)
    preset = args.preset or "auto"
    cfg = check_settings(args.model, args.method, preset, overrides)
    batch_size = args.batch_size or cfg.batch_size
    validate_requests(requests, None, batch_size=batch_size)  # all but lengths (no tokenizer)
    check_out_file(args.out, args.overwrite)
    check_corpus(args.corpus, cfg.stats_samples)
    check_model(args.model)
    group = init_from_env()  # under torchrun: one rank of a data-parallel edit
    editor = Editor.from_pretrained(args.model, args.method, preset=preset,
                                    engine=args.engine, corpus=args.corpus,
                                    dtype=DTYPES[args.dtype], **overrides)
    reports = editor.edit(requests, batch_size=args.batch_size)  # (None: the preset's)
    check_out_after_edits(args.out, args.overwrite, group)
    path = editor.save_edits(args.out)  # (rank 0 writes it)
    total = sum(r.seconds for r in reports)
    if group is None or group.is_main:
        ranks = "" if group is None else f" on {group.world} ranks"
        print(f"{len(requests)} edits in {len(reports)} batch(es){ranks}, {total:.1f} s "
              f"({total / len(requests):.2f} s/edit); saved to {path}")
    if group is not None:
        torch.distributed.destroy_process_group()
    return 0


def check_out_after_edits(path: str, overwrite: bool, group: Any) -> None:
    """Check ``--out`` again after the (long) edits: something may have taken the name
    meanwhile. Under a process group only rank 0 looks (it alone writes, and may already have
    written when a slower rank would look) and all ranks learn the answer."""
    if group is None:
        check_out_file(path, overwrite)
        return
    error = None
    if group.is_main:
        try:
            check_out_file(path, overwrite)
        except ConfigError as exc:
            error = exc
    group.agree(error, f"checking --out {path}")


def build_parser() -> argparse.ArgumentParser:
    from encore_fast.editor import ENGINES
    from encore_fast.methods import RULES

    parser = argparse.ArgumentParser(prog="encore-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None,
                       help="Hugging Face name or local path (default: the bundled SmolLM2-135M)")
        p.add_argument("--method", default="encore", choices=sorted(RULES),
                       help="editing method (default: encore)")
        p.add_argument("--engine", default="fast", choices=ENGINES,
                       help="fast (default) or reference (slow, the published algorithm)")
        p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                       help="model dtype; bf16/fp16 edit with fp32 master weights "
                            "(default: fp32)")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="setting override (JSON value); repeatable")

    demo = sub.add_parser("demo", help="edit facts in the bundled model, before/after")
    model_args(demo)
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", help="apply a JSON/JSONL file of requests, save the edits")
    edit.add_argument("requests", help="JSON list or JSONL of {prompt, subject, target_new}")
    edit.add_argument("--out", default="edits.safetensors",
                      help="where to save the edits (default: edits.safetensors)")
    edit.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    edit.add_argument("--batch-size", type=positive_int, default=None,
                      help="edits per batch (default: the preset's)")
    edit.add_argument("--preset", default=None,
                      help="settings preset (default: from the model's name)")
    edit.add_argument("--corpus", default=None, help="text for C0 (file, or dataset name)")
    model_args(edit)
    edit.set_defaults(func=cmd_edit)

    from encore_fast.eval.cli import (
        add_eval_arguments,
        add_snapshot_arguments,
        run_eval,
        run_eval_snapshots,
    )

    ev = sub.add_parser("eval", help="sequential editing run with evaluation")
    add_eval_arguments(ev)
    ev.set_defaults(func=run_eval)

    snaps = sub.add_parser("eval-snapshots", help="evaluate the weight snapshots of a run")
    add_snapshot_arguments(snaps)
    snaps.set_defaults(func=run_eval_snapshots)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; a user mistake ends in one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command != "edit":
        print(f"encore-fast {args.command}: error: only 'edit' runs under torchrun "
              f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); run {args.command} in one process",
              file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(error_line(args.command, exc), file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if not isinstance(exc, OSError) or exc.filename is None or str(
        exc.filename) in text else f"{text}: {exc.filename}"


if __name__ == "__main__":
    raise SystemExit(main())
