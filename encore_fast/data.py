"""The standard data sets by name: where each comes from, its licence, its size and SHA-256,
and getting it onto this machine once.

A name (``encore-fast data list``) stands for one file at a fixed place inside a data folder
(``counterfact/counterfact-edit.json``, ``wikitext-2/valid.txt``, ``downstream/sst2.json``, ...).
:func:`locate` takes a name, or such a place (a folder such as ``downstream`` stands for every
file under it), and returns a local path: the first copy in a folder the caller gives,
``$ENCORE_FAST_DATA`` or the data folder beside the checkout, then the download cache
(``<cache_dir>/data``, laid out the same way); otherwise it downloads the file into the cache:

* streamed in chunks to ``<file>.part`` beside its final place (a progress bar when it is big);
* resumed after an interruption: the part file is kept, and the next request asks for
  ``Range: bytes=N-``; a 206 answer is appended, a 200 answer (the server ignores ranges)
  starts the file over. Up to :data:`RETRIES` interruptions are resumed at once; after that
  the part file waits for the next call;
* checked (size, then SHA-256) before it is renamed into place: a wrong checksum removes the
  part file and keeps nothing, and the error says what was expected and what came;
* a file published in another form (the ENCORE repository's downstream tasks are pickles of
  plain lists) is converted after that check, and the result checked against its own
  SHA-256 (``derived_sha256``) before it is written.

Checksums: ``sha256`` is the SHA-256 of the file as it is published, and ``checksum`` says how
it is known (a git blob or a git-LFS pointer at a pinned commit, or the data folder's copy where
the publisher gives no checksum). Where none could be established, ``sha256`` is None,
``checksum`` says why, and a download is kept unverified with a warning that prints the SHA-256
it got (trust on first use). Local copies in a data folder are used as they are, unchecked:
such a folder is the user's own.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from encore_fast.errors import EncoreFastError
from encore_fast.paths import data_cache_dir, data_folders

ENV_DATA = "ENCORE_FAST_DATA"
CHUNK = 1 << 16  # bytes read per step of a download
RETRIES = 3  # interruptions of one transfer resumed at once, before giving up for now
PROGRESS_MIN = 1 << 20  # files this big (bytes) get a progress bar
USER_AGENT = "encore-fast (https://pypi.org/project/encore_fast)"


class DataError(EncoreFastError):
    """A data set that is unknown, not here, cannot be downloaded, or arrived damaged; the
    message is one line naming the file and what to do."""


@dataclass(frozen=True)
class DataSet:
    """One named data file. ``path``: its place inside a data folder. ``url`` (then
    ``mirrors``): where it is downloaded from. ``size``/``sha256``: of the file as published
    (None: not known; ``checksum`` says why, or how the SHA-256 is known). ``convert``: how the
    published file becomes the one at ``path`` (``"pickle-json"``), whose own size and SHA-256
    are ``derived_size``/``derived_sha256``."""

    name: str
    path: str
    about: str
    url: str
    licence: str
    size: int | None
    sha256: str | None
    checksum: str
    mirrors: tuple[str, ...] = ()
    convert: Literal["pickle-json"] | None = None
    derived_size: int | None = None
    derived_sha256: str | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        """Where to download from, in order."""
        return (self.url, *self.mirrors)

    @property
    def local_size(self) -> int | None:
        """The size of the file at ``path`` (the converted one, for a converted data set)."""
        return self.derived_size if self.convert else self.size

    @property
    def local_sha256(self) -> str | None:
        """The SHA-256 of the file at ``path`` (the converted one, for a converted data set)."""
        return self.derived_sha256 if self.convert else self.sha256


# ----------------------------------------------------------------------------- the registry

def github_file(repo: str, commit: str, path: str, lfs: bool = False) -> str:
    """The download URL of ``path`` in a GitHub repository at ``commit`` (``lfs``: a file
    kept in git LFS, served from GitHub's media host)."""
    if lfs:
        return f"https://media.githubusercontent.com/media/{repo}/{commit}/{path}"
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_ROME_HOST = "https://rome.baulab.info/data/dsets"
_MEMIT_HOST = "https://memit.baulab.info/data/dsets"
_KS = ("Jometeorie/KnowledgeSpread", "51d7402617c2e52bde0dc11b76e400c3725a181a")
_ENCORE = ("scalable-model-editing/encore", "b87d96da3aa286e49dd4b5c2c4d7a004ad8de618")
_PYTORCH = ("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8")
_REBUILDING = ("scalable-model-editing/rebuilding-rome", "4095d048607292ec0ac3c1333124a94bb61a3bcb")
_GPT_RE = ("MaxLEAF3824/gpt_re", "a9e7184cadc030dc86a35aa746b1811fb5ed3ae0")
_NO_CHECKSUM = ("none: the publisher gives no checksum or size and no copy was at hand to hash; "
                "a download is kept unverified (its SHA-256 is printed)")
_CF_LICENCE = "MIT (ROME)"
_KS_LICENCE = "Apache-2.0 (KnowledgeSpread)"


def _blob(repo: tuple[str, str], path: str) -> str:
    return f"published: git blob {path} at {repo[0]}@{repo[1][:7]}"


def _knowledge_spread(name: str, path: str, about: str, size: int, sha256: str) -> DataSet:
    """A file of the KnowledgeSpread repository (CounterFact/zsRE in EasyEdit's layout)."""
    source = f"data/{path}"
    return DataSet(name, path, about, github_file(*_KS, source), _KS_LICENCE, size, sha256,
                   _blob(_KS, source))


def _pytorch_wikitext(split: str, size: int, sha256: str) -> DataSet:
    """A WikiText-2 split as pytorch/examples ships it (tokenized, ``<unk>``, `` @-@ ``)."""
    source = f"word_language_model/data/wikitext-2/{split}.txt"
    return DataSet(f"wikitext-2-{split}", f"wikitext-2/{split}.txt",
                   f"WikiText-2 {split} split (Merity et al.; tokenized v1)",
                   github_file(*_PYTORCH, source), "CC BY-SA 3.0", size, sha256,
                   _blob(_PYTORCH, source))


# task -> (pickle size, pickle SHA-256, JSON size, JSON SHA-256)
_DOWNSTREAM = {
    "cola": (38151, "60647626a1552b7070495ae919603a35ba04474b106d132b47067b7884bb6dc3",
             53692, "86a2d858366cd57d26422fa9077b6ec863ed4fac6acd770bd82003f2a6a572c8"),
    "dialogue": (652342, "b908c05f2c7928afbce88843ff07bb84805c5dc51753236260283cba5bbb52a1",
                 658827, "3898a0a589f7f033638434f97c9b11f76d3e92bfe9697d15d9b4c2e46cf297c4"),
    "mmlu": (757282, "fda21bebe7a7cdbaaac856ddb6e214bb78808ab845b64f25c5bf111474c6e715",
             815751, "b6be56e82f025da1918562da09a8545b40a1820738b4f6bd6ebd5d679ac0ff68"),
    "mrpc": (66240, "11c20371e9e078397de2c5005d7358649ff7a6e830eac5af05bd232f4113875a",
             76116, "9ac8f96a3bec5bae326117134f0cfb9128f90cd5d9cfc51cd864a07df7b14648"),
    "nli": (898153, "758f03cb511f1e5658648942818e35977998134a8ef35d46f475389b95c7e19b",
            991512, "20983a6ba18e2b6421371b0831b7d1d05b62cca0ffd1d833ede8f6ea9d916969"),
    "rte": (86425, "f7e6b18e88067019e3ca5bddd4c6e54db35542f2822e72b34f7216441508eb84",
            96100, "105f1725a2d89e0eba3247811b10341b96844ab80c745da95395e16921226cef"),
    "sentiment_analysis": (
        103680, "5c8a278c8521047488ed7ed0ec00a5b9c350fbbcef1dc3603f9c596110f1618f",
        120204, "65adc18b9e93de923e81a3b5e3d48ccc80dbb92a0288662d6c6b80dacd02d7b8"),
    "sst2": (105835, "e09e2cc85b7182b322012f93951b3c12f5efacd455955675bb9af81433c58b7a",
             126481, "6081acf088b682768fe22d7d6c67bea191d30652ac564f2ea5aa69e7cec01af7"),
}


# The ENCORE repository states no licence; each subset keeps its task's own terms.
_DOWNSTREAM_LICENCE = {
    "cola": "GLUE task terms (CoLA)", "mrpc": "GLUE task terms (MRPC)",
    "nli": "GLUE task terms (MNLI)", "rte": "GLUE task terms (RTE)",
    "sst2": "GLUE task terms (SST-2)", "sentiment_analysis": "SST terms",
    "mmlu": "MIT (MMLU)", "dialogue": "unstated (MuTual-style)",
}


def _downstream(task: str) -> DataSet:
    """An ENCORE downstream task subset: a pickle in the ENCORE repository, kept as JSON."""
    size, sha256, json_size, json_sha256 = _DOWNSTREAM[task]
    source = f"glue_eval/dataset/{task}.pkl"
    return DataSet(f"downstream-{task}", f"downstream/{task}.json",
                   f"ENCORE paper's {task} subset (downstream degradation check)",
                   github_file(*_ENCORE, source), _DOWNSTREAM_LICENCE[task], size, sha256,
                   _blob(_ENCORE, source), convert="pickle-json", derived_size=json_size,
                   derived_sha256=json_sha256)


def _registry() -> dict[str, DataSet]:
    """Every known data set, by name."""
    entries = [
        DataSet("counterfact", "counterfact/counterfact.json",
                "CounterFact, ROME's layout (requested_rewrite, paraphrase/neighborhood prompts)",
                github_file(*_REBUILDING, "data/counterfact.json", lfs=True), _CF_LICENCE,
                45108470, "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
                "published: git-LFS pointer data/counterfact.json at "
                f"{_REBUILDING[0]}@{_REBUILDING[1][:7]} (ROME's host gives none)",
                mirrors=(f"{_ROME_HOST}/counterfact.json",)),
        DataSet("multi_counterfact", "counterfact/multi_counterfact.json",
                "CounterFact for mass editing, MEMIT's layout (as counterfact)",
                f"{_MEMIT_HOST}/multi_counterfact.json", "MIT (MEMIT)", None, None,
                _NO_CHECKSUM),
        _knowledge_spread("counterfact-edit", "counterfact/counterfact-edit.json",
                          "CounterFact, EasyEdit's layout: the 10,000 edit records", 3950774,
                          "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec"),
        _knowledge_spread("counterfact-train", "counterfact/counterfact-train.json",
                          "CounterFact, EasyEdit's layout: 10,000 training records", 3949873,
                          "f7d443ffb0c5da6cbe816cdac45281ccb3f204b8a840f00d07a4aafa949bcd76"),
        _knowledge_spread("counterfact-val", "counterfact/counterfact-val.json",
                          "CounterFact, EasyEdit's layout: the validation records", 760303,
                          "42b44645471020a9419d183deb9e113e82941380046861770ea0083dabd13982"),
        DataSet("zsre", "zsre/zsre_mend_eval.json",
                "zsRE question rewrites, MEND's evaluation split (Levy et al.; MEND)",
                f"{_ROME_HOST}/zsre_mend_eval.json", "unstated (zsRE, via MEND/ROME)",
                None, None, _NO_CHECKSUM),
        _knowledge_spread("zsre-train-1k", "zsre/zsre_mend_train-1k.json",
                          "zsRE, MEND's layout: 1,000 training records", 537970,
                          "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60"),
        DataSet("known_1000", "known_1000.json",
                "facts a GPT-2-sized model knows (ROME's known facts)",
                github_file(*_GPT_RE, "data/known_1000.json"), "MIT (ROME)", 343217,
                "4e0e0d22d5a8539579babf6142e960ec2beb4ff933c2995362b05c5c3b730b96",
                "the data folder's copy (ROME's host gives none); the same bytes are "
                f"data/known_1000.json at {_GPT_RE[0]}@{_GPT_RE[1][:7]}",
                mirrors=(f"{_ROME_HOST}/known_1000.json",)),
        _pytorch_wikitext("valid", 1121681,
                          "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        _pytorch_wikitext("test", 1256449,
                          "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        *(_downstream(task) for task in sorted(_DOWNSTREAM)),
    ]
    return {e.name: e for e in entries}


REGISTRY: dict[str, DataSet] = _registry()
"""Every known data set, by name (``encore-fast data list``)."""


# ----------------------------------------------------------------------------- finding

def select(name: str) -> tuple[str, list[DataSet]]:
    """The place inside a data folder that ``name`` stands for, and the data sets under it: a
    registry name, or a place (a file's ``path``, or a folder such as ``downstream``)."""
    if name in REGISTRY:
        return REGISTRY[name].path, [REGISTRY[name]]
    place = name.strip("/")
    under = [e for e in REGISTRY.values() if e.path == place or e.path.startswith(place + "/")]
    if not place or not under:
        raise DataError(f"unknown data set {name!r}; `encore-fast data list` names them all")
    return place, under


def where(entry: DataSet, data_dir: str | os.PathLike[str] | None = None
          ) -> tuple[Literal["local", "cache", "missing"], Path | None]:
    """Whether ``entry`` has a local copy (a data folder), a cached one, or neither; and where."""
    for folder in data_folders(data_dir, cache=False):
        if (folder / entry.path).is_file():
            return "local", folder / entry.path
    cached = data_cache_dir() / entry.path
    return ("cache", cached) if cached.is_file() else ("missing", None)


def locate(name: str, *, download: bool = True, data_dir: str | os.PathLike[str] | None = None,
           progress: bool = True, timeout: float = 30.0) -> Path:
    """The local path of a data set (see :func:`select`): a data folder's copy, else the
    cached one, else (``download``) downloaded into the cache. A folder is served from one
    place: a data folder that has it, else the cache, filled with what it lacks."""
    place, entries = select(name)
    for folder in data_folders(data_dir, cache=False):
        if (folder / place).exists():
            return folder / place
    cache = data_cache_dir()
    for entry in entries:
        if not (cache / entry.path).is_file():
            if not download:
                raise DataError(_not_here(name, place))
            download_to_cache(entry, progress=progress, timeout=timeout)
    return cache / place


def _not_here(name: str, place: str) -> str:
    return (f"no copy of {place} here: run `encore-fast data fetch {name}` to download it, "
            f"or set {ENV_DATA} to a data folder that holds {place}")


# ----------------------------------------------------------------------------- downloading

class _Unreachable(Exception):
    """This URL gave no file (no connection, an HTTP error): try the next one."""


class _Interrupted(Exception):
    """The transfer broke off; what came is kept in the part file, to be resumed."""


def download_to_cache(entry: DataSet, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download ``entry`` into the cache, checked (and converted), and return its path; tries
    ``entry.urls`` in order. Raises DataError (one line) when none gives the file, or when
    it arrives damaged (then nothing is kept)."""
    dest = data_cache_dir() / entry.path
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in entry.urls:
        try:
            _transfer(url, part, entry, progress, timeout)
        except _Unreachable as exc:
            failures.append(f"{url} ({_oneline(exc)})")
            continue
        digest = _check(entry, part, url)
        _install(entry, part, dest, url)
        if entry.sha256 is None:
            warnings.warn(f"{entry.name}: no published SHA-256 to check {entry.path} against; "
                          f"kept unverified, its SHA-256 is {digest}", stacklevel=2)
        return dest
    raise DataError(
        f"cannot download {entry.path} for '{entry.name}': {'; '.join(failures)}; set "
        f"{ENV_DATA} to a data folder that holds {entry.path}, or run `encore-fast data fetch "
        f"{entry.name}` where the network is reachable, or pass the file's local path")


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _transfer(url: str, part: Path, entry: DataSet, progress: bool, timeout: float) -> None:
    """Fill ``part`` with the whole file at ``url``, resuming what it already holds; up to
    :data:`RETRIES` interruptions are resumed at once, then the part file is left for later."""
    for attempt in range(RETRIES + 1):
        try:
            _get(url, part, entry, progress, timeout)
            return
        except _Interrupted as exc:
            if attempt == RETRIES:
                raise _Unreachable(f"interrupted {attempt + 1} times, last: {_oneline(exc)}; "
                                   f"the {part.stat().st_size if part.exists() else 0} bytes "
                                   "received are kept to resume") from None


def _open(url: str, part: Path, have: int, timeout: float) -> http.client.HTTPResponse:
    """Send the request (asking for the bytes from ``have`` on, when ``part`` holds some)."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # (the part file is no prefix the server knows of)
            part.unlink(missing_ok=True)
            raise _Interrupted("range refused: starting over") from None
        raise _Unreachable(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Unreachable(_oneline(getattr(exc, "reason", exc))) from None


def _resumes(resp: http.client.HTTPResponse, have: int) -> bool:
    """Whether the answer continues the part file: a 206 whose range starts where it ends."""
    if not have or resp.status != 206:
        return False
    content_range = resp.headers.get("Content-Range", "")  # "bytes 100-999/1000"
    start = content_range.removeprefix("bytes ").split("-", 1)[0].strip()
    return start.isdigit() and int(start) == have


def _get(url: str, part: Path, entry: DataSet, progress: bool, timeout: float) -> None:
    """One request: append to ``part`` (206) or write it anew (200)."""
    have = part.stat().st_size if part.exists() else 0
    if entry.size is not None and have >= entry.size:
        if have == entry.size:
            return  # complete already: checked next
        part.unlink()
        have = 0
    with _open(url, part, have, timeout) as resp:
        if not _resumes(resp, have):
            if resp.status == 206:  # a range that does not continue the file: start over
                part.unlink(missing_ok=True)
                raise _Interrupted("the server sent another range")
            have = 0
        length = resp.headers.get("Content-Length", "")
        total = have + int(length) if length.isdigit() else entry.size
        show = progress and (total or 0) >= PROGRESS_MIN
        part.parent.mkdir(parents=True, exist_ok=True)
        with (open(part, "ab" if have else "wb") as out,
              tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=entry.name, disable=not show, leave=False) as bar):
            while chunk := _read(resp):
                out.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"the transfer ended at {got} of {total} bytes")


def _read(resp: http.client.HTTPResponse) -> bytes:
    """The next chunk of the answer; a broken transfer is an interruption."""
    try:
        return resp.read(CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(_oneline(exc) or type(exc).__name__) from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check(entry: DataSet, part: Path, url: str) -> str:
    """The SHA-256 of the downloaded file, after checking it and its size; a damaged file is
    removed (nothing is kept) and DataError says what was expected and what came."""
    size, digest = part.stat().st_size, sha256_file(part)
    if (entry.size is not None and size != entry.size) or entry.sha256 not in (None, digest):
        part.unlink(missing_ok=True)
        raise DataError(
            f"{entry.path} from {url} is damaged: expected SHA-256 {entry.sha256} "
            f"({entry.size} bytes), got {digest} ({size} bytes); nothing was kept, "
            f"run `encore-fast data fetch {entry.name}` to try again")
    return digest


def _install(entry: DataSet, part: Path, dest: Path, url: str) -> None:
    """Put the checked file at ``dest`` (atomically), converted first where it must be."""
    if entry.convert is None:
        os.replace(part, dest)
        return
    try:
        body = convert_pickle(part)
    except Exception as exc:  # (whatever the pickle holds, nothing of it is kept)
        part.unlink(missing_ok=True)
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{entry.path}: cannot convert the file from {url} "
                        f"({type(exc).__name__}: {_oneline(exc)}); nothing was kept") from None
    digest = hashlib.sha256(body).hexdigest()
    if entry.derived_sha256 not in (None, digest):
        part.unlink(missing_ok=True)
        raise DataError(
            f"{entry.path} converted from {url} differs from the one recorded: expected "
            f"SHA-256 {entry.derived_sha256}, got {digest}; nothing was kept")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(body)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    part.unlink(missing_ok=True)


class _PlainUnpickler(pickle.Unpickler):
    """Reads plain data only (lists, dicts, strings, numbers): a class or function named in
    the stream is refused, so the pickle cannot run code."""

    def find_class(self, module: str, name: str) -> type:
        raise DataError(f"the pickle names {module}.{name}; only plain data is read, "
                        "nothing was kept")


def convert_pickle(path: str | os.PathLike[str]) -> bytes:
    """The JSON text (UTF-8) of a pickle of plain data: how the ENCORE repository's
    downstream task pickles become the ``downstream/*.json`` files."""
    with open(path, "rb") as fh:
        obj = _PlainUnpickler(fh).load()
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")
