"""``encore-fast eval``: a sequential editing run with evaluations, from the command line.

The main CLI wires it as a subcommand::

    sub = subparsers.add_parser("eval", help="sequential editing run with evaluation")
    add_eval_arguments(sub)
    sub.set_defaults(func=run_eval)

The helpers below are shared with ``benchmarks/compare_methods.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encore_fast.cli_common import (  # (positive_int, non_negative_int: also re-exported)
    CHAT_HELP,
    USER_ERRORS,
    add_model_options,
    check_corpus,
    check_model,
    check_settings,
    error_line,
    int_at_least,
    method_help,
    non_negative_int,
    positive_int,
)
from encore_fast.config import parse_overrides  # (also re-exported: the one --set parser)
from encore_fast.editor import Editor
from encore_fast.eval.datasets import (
    LAYOUTS,
    DatasetError,
    EvalRecord,
    load_dataset,
)
from encore_fast.eval.health import (  # noqa: F401 (the data defaults, importable from here)
    DEFAULT_DOWNSTREAM,
    DEFAULT_KNOWN,
    DEFAULT_WIKITEXT,
)
from encore_fast.eval.registry import enabled_metrics, registered
from encore_fast.eval.report import load_run, markdown_table, summarize_run
from encore_fast.eval.run import (
    CONFIG_FILE,
    EvalSettings,
    RunConfigError,
    arrange_batches,
    evaluate_snapshots,
    run_sequential,
)
from encore_fast.eval.seam import Option, data_file
from encore_fast.eval.settings import FIELDS, SAMPLINGS, STUDY
from encore_fast.methods import MethodNames
from encore_fast.models.dtypes import DTYPES
from encore_fast.models.loading import load_model
from encore_fast.requests import validate_requests

DEFAULT_DATASET = "counterfact/counterfact-edit.json"
EVAL_SAMPLE = 100  # --eval-sample's default
PROTOCOLS = ("custom", "study")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data, stream and evaluation options (everything but the method and folder)."""
    g = parser.add_argument_group("model")
    add_model_options(g)
    g.add_argument("--preset", default="auto",
                   help="settings preset (auto: from the model name; see encore_fast.config)")
    g.add_argument("--corpus", default=None, help="text corpus for the key statistics C0")
    _add_stream_options(parser)
    _add_evaluation_options(parser)


def _add_stream_options(parser: argparse.ArgumentParser) -> None:
    """The edit stream: data, layout, size and batches."""
    g = parser.add_argument_group("edit stream")
    g.add_argument("--dataset", default="auto", help=f"data file or URL (auto: {DEFAULT_DATASET})")
    g.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS),
                   help="record layout of the data (default: detected)")
    g.add_argument(
        "--on-error",
        default="raise",
        choices=("raise", "warn"),
        help="malformed records: stop, or warn and skip them",
    )
    g.add_argument("--num-edits", type=positive_int, default=100,
                   help="edits in the stream (default: 100)")
    g.add_argument("--batch-size", type=positive_int, default=10, help="edits per batch")


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """When and on what the evaluations run, each registered metric's options, and output."""
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=non_negative_int, default=2,
                   help="evaluate every k batches (0: end)")
    g.add_argument(
        "--eval-sample",
        type=non_negative_int,
        default=EVAL_SAMPLE,
        help="evaluate a fixed random sample of this many records (0: all; with "
             "--eval-sampling edited, 0 means the protocol's 1000)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of that sample")
    g.add_argument("--eval-sampling", default="stream", choices=SAMPLINGS,
                   help="stream: the sample is drawn from the whole stream, and each "
                        "evaluation scores its edited records (the default); edited: each "
                        "evaluation scores --eval-sample edited facts, the same for every "
                        "method and nested across evaluations (the study's)")
    g.add_argument("--protocol", default="custom", choices=PROTOCOLS,
                   help="study: the study's protocol at once (--eval-sampling edited, "
                        "--eval-sample 1000, --downstream-n 400, every known fact, "
                        "--realistic, --forgetting 1000, --immediate); an option given with "
                        "a value other than its default keeps that value")
    for metric in registered():
        for option in metric.options:
            _add_option(g, option)
    g.add_argument("--defer-eval", action="store_true",
                   help="only save weight snapshots at the evaluation points; evaluate them "
                        "with 'encore-fast eval-snapshots' (e.g. beside the run)")
    g.add_argument("--score-batch-size", type=positive_int, default=16,
                   help="prompts per forward")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_option(group: Any, option: Option) -> None:
    """A metric's option as an argparse argument (integers with a minimum checked)."""
    if option.switch:
        group.add_argument(option.flag, action="store_true", help=option.help)
        return
    kind = option.type
    if option.minimum is not None:
        kind = int_at_least(option.minimum)
    extra = {"choices": option.choices} if option.choices is not None else {}
    group.add_argument(option.flag, type=kind, default=option.default, help=option.help,
                       **extra)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """All options of ``encore-fast eval``."""
    parser.add_argument("--method", default="encore", choices=MethodNames(),
                        metavar="METHOD", help=method_help())
    parser.add_argument("--chat", action="store_true", help=CHAT_HELP)
    parser.add_argument("--out", default=None, help="run folder (default: runs/<method>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--stop-on-collapse", action="store_true",
                        help="end the run when the study's collapse rule holds (perplexity "
                             "x10, or the informative downstream mean F1 at its majority "
                             "level, at two evaluations in a row); with --defer-eval, on "
                             "the evaluations that 'eval-snapshots --follow' beside it has "
                             "written so far")
    add_common_arguments(parser)


def records_from_args(args: argparse.Namespace) -> list[EvalRecord]:
    """The edit stream's records (the first ``--num-edits`` of the data set)."""
    source = data_file(args.dataset, DEFAULT_DATASET, "--dataset")
    if source is None:
        raise DatasetError("--dataset none: an edit stream is required")
    return load_dataset(source, layout=args.layout, on_error=args.on_error, limit=args.num_edits)


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The evaluation settings the options describe (each registered metric's options fill its
    settings; those of metrics added later go into ``metric_settings`` when not default)."""
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for metric in registered():
        for option in metric.options:
            value = option.setting_value(getattr(args, option.dest, option.default))
            if option.setting in FIELDS:
                fields[option.setting] = value
            elif value != metric.settings.get(option.setting):
                extra[option.setting] = value
    chosen = dict(sample=args.eval_sample or None, seed=args.seed,
                  batch_size=args.score_batch_size, defer=getattr(args, "defer_eval", False),
                  sampling=getattr(args, "eval_sampling", "stream"), **fields)
    if getattr(args, "protocol", "custom") == "study":
        chosen = study_settings(chosen)
    return EvalSettings(metric_settings=extra, **chosen)


def study_settings(chosen: dict[str, Any]) -> dict[str, Any]:
    """``--protocol study``: the study's value (:data:`~encore_fast.eval.settings.STUDY`) of
    each setting whose option was left at its default."""
    defaults: dict[str, Any] = {"sample": EVAL_SAMPLE, "sampling": "stream"}
    defaults.update({o.setting: o.setting_value(o.default) for m in registered()
                     for o in m.options if o.setting in STUDY})
    return {**chosen, **{k: v for k, v in STUDY.items()
                         if chosen.get(k, defaults.get(k)) == defaults.get(k)}}


def editor_factory(
    args: argparse.Namespace, method: str, overrides: dict[str, Any]
) -> Callable[[], Any]:
    """A zero-argument function that builds a fresh, unedited editor (needed for resume)."""

    def build() -> Any:
        return Editor.from_pretrained(
            args.model,
            method=method,
            preset=args.preset,
            engine=args.engine,
            corpus=args.corpus,
            dtype=DTYPES[getattr(args, "dtype", "fp32")],
            chat=getattr(args, "chat", False),
            **overrides,
        )

    return build


def _checked_factory(build: Callable[[], Any], settings: EvalSettings) -> Callable[[], Any]:
    """``build``, then the evaluation data checked against the editor's tokenizer (e.g. one
    perplexity window at least), before a run folder is made."""

    def checked() -> Any:
        editor = build()
        check_eval_tokenizer(settings, editor.tokenizer)
        return editor

    return checked


def check_eval_data(settings: EvalSettings) -> None:
    """Refuse, before a model is loaded, evaluation data that cannot be used (each metric the
    settings ask for checks its own: e.g. a perplexity text that is missing or not UTF-8, fewer
    ``--ppl-tokens`` than one ``--ppl-window``, known facts that are missing or malformed;
    :class:`DatasetError`)."""
    for metric in enabled_metrics(settings):
        metric.check(settings)


def check_eval_tokenizer(settings: EvalSettings, tokenizer: Any) -> None:
    """The evaluation data work with the model's tokenizer (e.g. the perplexity text gives at
    least one window of ``ppl_window`` tokens)."""
    for metric in enabled_metrics(settings):
        metric.check_tokenizer(settings, tokenizer)


check_perplexity_text = check_eval_tokenizer  # (its former name)


def run_info(args: argparse.Namespace, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """What identifies the run besides the stream and settings (checked on resume)."""
    return {
        "label": method,
        "model": args.model,
        "preset": args.preset,
        "engine": args.engine,
        "dtype": getattr(args, "dtype", "fp32"),
        "corpus": args.corpus,
        "overrides": overrides,
        "dataset": args.dataset,
        **({"chat": True} if getattr(args, "chat", False) else {}),  # (older runs: no key)
    }


def run_eval(args: argparse.Namespace) -> int:
    """Run ``encore-fast eval``; prints a summary table. Returns the exit status (2, with one
    line on stderr, for a user mistake; nothing is written then)."""
    try:
        # Everything that can be checked without the model first: nothing is loaded, and no
        # run folder made, for a mistake in the settings, the paths or the data.
        overrides = parse_overrides(args.overrides)
        cfg = check_settings(args.model, args.method, args.preset, overrides)
        check_corpus(args.corpus, cfg.stats_samples)
        out = Path(args.out or Path("runs") / args.method)
        if out.exists() and not out.is_dir():
            raise RunConfigError(f"--out {out}: a file, not a run folder")
        records = records_from_args(args)
        if len(records) < args.num_edits:
            print(f"encore-fast eval: --num-edits {args.num_edits}, but {args.dataset} has "
                  f"{len(records)} usable record(s): editing {len(records)}", file=sys.stderr)
        stream, _ = arrange_batches(records[: args.num_edits], args.batch_size)
        validate_requests([rec.request for rec in stream], None, batch_size=args.batch_size)
        settings = settings_from_args(args)
        check_eval_data(settings)
        check_model(args.model)
        run_sequential(
            _checked_factory(editor_factory(args, args.method, overrides), settings),
            records,
            out,
            num_edits=min(args.num_edits, len(records)),
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            settings=settings,
            resume=args.resume,
            run_info=run_info(args, args.method, overrides),
            progress=not args.quiet,
            make_plots=not args.no_plots,
            stop_on_collapse=getattr(args, "stop_on_collapse", False),
        )
    except USER_ERRORS as exc:
        print(error_line("eval", exc), file=sys.stderr)
        return 2
    print(markdown_table([summarize_run(load_run(out))]), end="")
    print(f"results: {out / 'results.jsonl'}")
    return 0


def add_snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    """All options of ``encore-fast eval-snapshots``."""
    parser.add_argument("run", help="run folder (of 'encore-fast eval')")
    parser.add_argument("--follow", action="store_true",
                        help="keep waiting for new snapshots until the run's last one")
    parser.add_argument("--at", type=edit_counts, default=None, metavar="N,N,...",
                        help="evaluate only the snapshots after these numbers of edits (and "
                             "the unedited one), e.g. 1000,2000,3000,5000,7500,10000; 0: the "
                             "unedited one alone")
    parser.add_argument("--stop-on-collapse", action="store_true",
                        help="evaluate no snapshot after the evaluations so far meet the "
                             "study's collapse rule")
    add_common_arguments(parser)


def edit_counts(text: str) -> list[int]:
    """``"1000,2000"`` -> ``[1000, 2000]`` (an argparse type: numbers of edits >= 0; 0 alone
    asks for the unedited model's evaluation only)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers of edits like 1000,2000, got "
                                         f"{text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected numbers of edits >= 0, got {text!r}")
    return values


def run_eval_snapshots(args: argparse.Namespace) -> int:
    """Run ``encore-fast eval-snapshots``: evaluate a run's weight snapshots into
    ``evals.jsonl`` (resumable); prints the summary table."""
    try:
        run = Path(args.run)
        if not (run / CONFIG_FILE).is_file():
            raise RunConfigError(f"{run}: not a run folder ({CONFIG_FILE} missing)")
        config = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
        args.num_edits = config["num_edits"]
        records = records_from_args(args)
        settings = settings_from_args(args)
        check_eval_data(settings)
        check_model(args.model)
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])  # (in eval mode)
        check_eval_tokenizer(settings, tokenizer)
        evaluate_snapshots(run, model, tokenizer, records, settings, follow=args.follow,
                           at=args.at, progress=not args.quiet,
                           stop_on_collapse=args.stop_on_collapse)
    except USER_ERRORS as exc:
        print(error_line("eval-snapshots", exc), file=sys.stderr)
        return 2
    print(markdown_table([summarize_run(load_run(run))]), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m encore_fast.eval.cli``)."""
    parser = argparse.ArgumentParser(prog="encore-fast eval", description=__doc__.split("\n")[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
