"""What both command lines share (``encore-fast`` and its ``eval`` subcommands): the model
options, the argparse integer types, the checks made before a model is loaded, and the one-line
report of a user's mistake.

It sits below both CLIs (``encore_fast.cli`` and ``encore_fast.eval.cli`` import it, it imports
neither), so the two command lines need no import of each other's helpers.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from encore_fast.config import EditConfig, guess_preset, make_config
from encore_fast.editor import ENGINES
from encore_fast.errors import ConfigError, EncoreFastError
from encore_fast.eval.datasets import DatasetError
from encore_fast.eval.results import RunConfigError
from encore_fast.methods import ALIASES, RULES, TRANSFORMS, canonical
from encore_fast.models.dtypes import DTYPES
from encore_fast.models.loading import BUNDLED_NAMES
from encore_fast.stats import load_corpus

USER_ERRORS = (EncoreFastError, DatasetError, RunConfigError, OSError)
"""What a user's mistake raises (bad input, setting, file, or run folder); anything else is a
bug and keeps its traceback."""


def error_line(command: str, exc: BaseException) -> str:
    """``encore-fast <command>: error: <message>``, on one line."""
    return f"encore-fast {command}: error: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    """The exception's message with its whitespace folded, plus the file an OSError names."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if not isinstance(exc, OSError) or exc.filename is None or str(
        exc.filename) in text else f"{text}: {exc.filename}"


# ----------------------------------------------------------------------------- options

def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (argparse reports anything else in one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


class ArgumentAdder(Protocol):
    """An argparse parser or argument group: whatever has ``add_argument``."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any: ...


def add_model_options(parser: ArgumentAdder) -> None:
    """Add ``--model``, ``--engine``, ``--dtype`` and ``--set`` (dest ``overrides``): which
    model is edited, by which engine, in which dtype, with which setting overrides. The method,
    preset and corpus options stay with each command (their defaults differ)."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face name or local path (default: the bundled SmolLM2-135M)")
    parser.add_argument("--engine", default="fast", choices=ENGINES,
                        help="fast (default) or reference (slow, the published algorithm)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="model dtype; bf16/fp16 edit with fp32 master weights "
                             "(default: fp32)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="setting override (VALUE read as JSON when it is JSON); repeatable")


# ----------------------------------------------------------------------------- checks

def check_settings(model: str | None, method: str, preset: str | None,
                   overrides: dict[str, Any]) -> EditConfig:
    """Refuse unknown or bad settings before a model is loaded (ConfigError); the layers are
    checked against the model's depth once it is loaded. Returns the settings (as far as they
    are known without the model)."""
    if preset == "auto":
        preset = guess_preset("smollm2-135m" if model is None else str(model))
    return make_config(canonical(method), preset, None, **overrides)


def _looks_like_path(text: str) -> bool:
    """A local path rather than a hub name (``owner/name``) or a dataset name."""
    return (text.startswith(("/", "./", "../", "~")) or text in (".", "..") or "\\" in text
            or text.count("/") >= 2)


def check_model(model: str | None) -> None:
    """Refuse a ``--model`` path that does not exist or holds no saved model, before loading.
    Hub names are left to the loader (its errors are OSErrors, reported in one line)."""
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


def method_help() -> str:
    """``--method``'s help: the registered rules, transforms and aliases, and how to compose."""
    return (f"editing method (default: encore): a rule ({', '.join(sorted(RULES))}), an alias "
            f"({', '.join(f'{a} = {m}' for a, m in sorted(ALIASES.items()))}) or a rule joined "
            f"with transforms ({', '.join(sorted(TRANSFORMS))}) by '+', e.g. alphaedit+nas")


CHAT_HELP = ("edit every request inside the tokenizer's chat template (the prompt the user's "
             "turn, the target the assistant's first words)")
