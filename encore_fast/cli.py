"""The encore-fast console command: demo, edit, eval, eval-snapshots and data."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from encore_fast.cli_common import (
    CHAT_HELP,
    USER_ERRORS,
    add_model_options,
    check_corpus,
    check_model,
    check_out_file,
    check_settings,
    error_line,
    method_help,
    non_negative_int,
    positive_int,
)
from encore_fast.config import parse_overrides
from encore_fast.data import REGISTRY, DataError, locate, select, where
from encore_fast.distributed import init_from_env
from encore_fast.editor import Editor
from encore_fast.errors import ConfigError
from encore_fast.eval.cli import (
    add_eval_arguments,
    add_snapshot_arguments,
    run_eval,
    run_eval_snapshots,
)
from encore_fast.export import GGUF_TYPES
from encore_fast.methods import MethodNames
from encore_fast.models.dtypes import DTYPES
from encore_fast.models.loading import pad_id
from encore_fast.requests import EditRequest, read_requests_file, validate_requests

__all__ = ["USER_ERRORS", "build_parser", "check_corpus", "check_model", "check_out_after_edits",
           "check_out_file", "check_settings", "cmd_data", "cmd_demo", "cmd_edit", "complete",
           "error_line", "main", "non_negative_int", "positive_int"]

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


def demo_corpus() -> str | None:
    """WikiText-2 for the demo's C0: a local copy, else downloaded once (1.1 MB); offline,
    None (the editor then samples text from the model, and warns)."""
    try:
        return str(locate("wikitext-2-valid", progress=False, timeout=10.0))
    except DataError as exc:
        print(f"(no WikiText-2: {exc})", file=sys.stderr)
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    """Edit a handful of facts in the bundled model and show predictions before and after."""
    overrides = parse_overrides(args.overrides)
    check_settings(args.model, args.method, "auto", overrides)
    check_model(args.model)
    print(f"Loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", flush=True)
    editor = Editor.from_pretrained(args.model, args.method, engine=args.engine,
                                    dtype=DTYPES[args.dtype], corpus=demo_corpus(), **overrides)
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
    # Everything that can be checked without the model is checked first: nothing is loaded
    # or written for a mistake in the requests, the settings, the paths.
    requests = read_requests_file(args.requests)
    overrides = parse_overrides(args.overrides)
    preset = args.preset or "auto"
    cfg = check_settings(args.model, args.method, preset, overrides)
    batch_size = args.batch_size or cfg.batch_size
    validate_requests(requests, None, batch_size=batch_size)  # all but lengths (no tokenizer)
    check_out_file(args.out, args.overwrite)
    check_model_dir(args.save_model, args.overwrite)
    if args.gguf and not args.save_model:
        raise ConfigError("--gguf writes model.gguf into the --save-model folder: give both")
    check_corpus(args.corpus, cfg.stats_samples)
    check_model(args.model)
    group = init_from_env()  # under torchrun: one rank of a data-parallel edit
    editor = Editor.from_pretrained(args.model, args.method, preset=preset,
                                    engine=args.engine, corpus=args.corpus,
                                    dtype=DTYPES[args.dtype], chat=args.chat, **overrides)
    reports = editor.edit(requests, batch_size=args.batch_size)  # (None: the preset's)
    check_out_after_edits(args.out, args.overwrite, group)
    path = editor.save_edits(args.out)  # (rank 0 writes it)
    total = sum(r.seconds for r in reports)
    if group is None or group.is_main:
        ranks = "" if group is None else f" on {group.world} ranks"
        print(f"{len(requests)} edits in {len(reports)} batch(es){ranks}, {total:.1f} s "
              f"({total / len(requests):.2f} s/edit); saved to {path}")
        if args.save_model:
            saved = editor.save_pretrained(args.save_model, args.overwrite, gguf=args.gguf)
            print(f"edited model: {saved}" + (" (and model.gguf)" if args.gguf else ""))
    if group is not None:
        torch.distributed.destroy_process_group()
    return 0


def check_model_dir(path: str | None, overwrite: bool) -> None:
    """``--save-model``: a new or empty folder (or ``--overwrite``), not a file."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise ConfigError(f"--save-model {target}: exists and is not an empty folder "
                          "(--overwrite replaces it)")


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


def _size(n: int | None) -> str:
    """A byte count for people (``45.1 MB``); ``?`` when it is not known."""
    if n is None:
        return "?"
    if n < 1000:
        return f"{n} B"
    return f"{n / 1e3:.1f} kB" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def _data_table(data_dir: str | None) -> list[str]:
    """``data list``'s lines: name, size, licence, and where its copy is."""
    width = max(len(name) for name in REGISTRY)
    lines = [f"{'name':<{width}} {'size':>9}  {'licence':<32} where"]
    for entry in REGISTRY.values():
        state, path = where(entry, data_dir)
        here = f"{state}: {path}" if path is not None else "not here"
        lines.append(f"{entry.name:<{width}} {_size(entry.local_size):>9}  "
                     f"{entry.licence:<32} {here}")
    return lines


def cmd_data(args: argparse.Namespace) -> int:
    """``data list``: every data set (size, licence, local/cached copy); ``data fetch NAME``:
    download and check it once (or say where its local copy is); ``data path NAME``: print
    its local path, or fail with one line saying how to get it."""
    if args.data_command == "list":
        print("\n".join(_data_table(args.data_dir)))
        return 0
    if args.data_command == "path":
        print(locate(args.name, download=False, data_dir=args.data_dir))
        return 0
    for name in args.names:
        select(name)  # (an unknown name is refused before anything is downloaded)
    for name in args.names:
        path = locate(name, data_dir=args.data_dir)
        cached = all(where(e, args.data_dir)[0] == "cache" for e in select(name)[1])
        print(f"{name}: {path} ({'download cache' if cached else 'local copy'})")
    return 0


def _data_parser(sub: Any) -> None:
    """``encore-fast data list|fetch NAME...|path NAME``."""
    text = "list, download (fetch) or find (path) the data sets"
    data = sub.add_parser("data", help=text, description=(
        f"{text}: a data folder's copy is used first ($ENCORE_FAST_DATA, or the data folder "
        "beside the checkout), else one downloaded once into the cache ($ENCORE_FAST_CACHE/data) "
        "and checked against its recorded SHA-256"))
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{list,fetch,path}",
                                   help="what to do with the data sets")
    commands = {
        "list": "every data set: size, licence, and where its copy is",
        "fetch": "download data sets into the cache, checked (once; a local copy is used)",
        "path": "print a data set's local path (fails when it is not here)",
    }
    for command, about in commands.items():
        cmd = data_sub.add_parser(command, help=about, description=about)
        if command == "fetch":
            cmd.add_argument("names", nargs="+", metavar="NAME",
                             help="a name from `data list`, or a folder such as downstream")
        elif command == "path":
            cmd.add_argument("name", metavar="NAME", help="a name from `data list`")
        cmd.add_argument("--data-dir", default=None,
                         help="a data folder to look in first (then $ENCORE_FAST_DATA, "
                              "the data folder beside the checkout, the download cache)")
    data.set_defaults(func=cmd_data)


def _model_args(parser: argparse.ArgumentParser) -> None:
    """The model options (shared with ``eval``) and ``--method``."""
    add_model_options(parser)
    parser.add_argument("--method", default="encore", choices=MethodNames(),
                        metavar="METHOD", help=method_help())


def build_parser() -> argparse.ArgumentParser:
    """The ``encore-fast`` parser: ``demo``, ``edit``, ``eval``, ``eval-snapshots``, ``data``."""
    parser = argparse.ArgumentParser(prog="encore-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="edit facts in the bundled model, before/after")
    _model_args(demo)
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", help="apply a JSON/JSONL file of requests, save the edits")
    edit.add_argument("requests", help="JSON list or JSONL of {prompt, subject, target_new}")
    edit.add_argument("--out", default="edits.safetensors",
                      help="where to save the edits (default: edits.safetensors)")
    edit.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out file (and --save-model folder)")
    edit.add_argument("--chat", action="store_true", help=CHAT_HELP)
    edit.add_argument("--save-model", default=None, metavar="DIR",
                      help="also write the edited model as a transformers checkpoint (weights "
                           "in the model's dtype, tokenizer, model card, edits.jsonl)")
    edit.add_argument("--gguf", default=None, choices=GGUF_TYPES,
                      help="with --save-model and the bundled model: also model.gguf, the "
                           "edited matrices in this type")
    edit.add_argument("--batch-size", type=positive_int, default=None,
                      help="edits per batch (default: the preset's)")
    edit.add_argument("--preset", default=None,
                      help="settings preset (default: from the model's name)")
    edit.add_argument("--corpus", default=None, help="text for C0 (file, or dataset name)")
    _model_args(edit)
    edit.set_defaults(func=cmd_edit)

    ev = sub.add_parser("eval", help="sequential editing run with evaluation")
    add_eval_arguments(ev)
    ev.set_defaults(func=run_eval)

    snaps = sub.add_parser("eval-snapshots", help="evaluate the weight snapshots of a run")
    add_snapshot_arguments(snaps)
    snaps.set_defaults(func=run_eval_snapshots)
    _data_parser(sub)
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


if __name__ == "__main__":
    raise SystemExit(main())
