"""Result numbers in the READMEs come from the data: every generated block equals what its
generator writes from the committed files, and a changed number is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

from encore_fast.eval.claims import blocks, check, fill, generate

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def claims(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (claims.py imports its generators, claims_blocks)
    yield load_benchmark("claims")
    for name in [m for m in sys.modules if m == "claims" or m.startswith("claims_blocks")]:
        sys.modules.pop(name, None)


def _all_blocks(claims) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in claims.READMES:
        found.update(blocks((claims.ROOT / name).read_text(encoding="utf-8")))
    return found


def test_the_readmes_blocks_equal_what_their_data_generates(claims):
    found = {}
    for name in claims.READMES:
        text = (claims.ROOT / name).read_text(encoding="utf-8")
        found.update(blocks(text))
        assert check(text, claims.GENERATORS, claims.ROOT) == [], name
    assert "refactor-23-speed" in found
    assert claims.main(["--check"]) == 0


def test_every_generator_has_its_block(claims):
    assert sorted(_all_blocks(claims)) == sorted(claims.GENERATORS)


def test_the_blocks_come_from_committed_files_alone(claims, tmp_path):
    """A copy of the repository holding only the committed files of benchmarks/results/ writes
    every block the same: no generator reads an uncommitted or outside file."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "benchmarks/results"], cwd=claims.ROOT,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [f for f in listed.decode().split("\0") if f]
    assert files
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(claims.ROOT / name, tmp_path / name)
    names = sorted(_all_blocks(claims))
    assert (generate(names, claims.GENERATORS, tmp_path)
            == generate(names, claims.GENERATORS, claims.ROOT))


def test_one_changed_number_fails_the_check(claims):
    text = (claims.ROOT / "benchmarks/results/refactor-23/README.md").read_text(encoding="utf-8")
    body = blocks(text)["refactor-23-speed"]
    edited = text.replace(body, body.replace("0.912", "0.892", 1))
    assert edited != text
    assert check(edited, claims.GENERATORS, claims.ROOT) == ["refactor-23-speed"]
    assert fill(edited, claims.GENERATORS, claims.ROOT) == text  # and filling mends it


def test_blocks_without_a_generator_or_twice_are_refused(claims):
    block = "<!-- claims:nobody -->\nx\n<!-- /claims:nobody -->\n"
    with pytest.raises(KeyError, match="nobody"):
        check(block, claims.GENERATORS, claims.ROOT)
    with pytest.raises(ValueError, match="twice"):
        blocks(block + block)
