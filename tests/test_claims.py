"""Result numbers in the READMEs come from the data: every generated block equals what its
generator writes from the committed files, and a changed number is caught."""

from __future__ import annotations

import sys

import pytest
from helpers import load_benchmark

from encore_fast.eval.claims import blocks, check, fill


@pytest.fixture
def claims():
    yield load_benchmark("claims")
    sys.modules.pop("claims", None)


def test_the_readmes_blocks_equal_what_their_data_generates(claims):
    found = {}
    for name in claims.READMES:
        text = (claims.ROOT / name).read_text(encoding="utf-8")
        found.update(blocks(text))
        assert check(text, claims.GENERATORS, claims.ROOT) == [], name
    assert "refactor-23-speed" in found
    assert claims.main(["--check"]) == 0


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
