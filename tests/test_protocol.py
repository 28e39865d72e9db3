"""The study protocol's arithmetic: intervals against hand computations, the paired sample,
chance levels, and the collapse rule on hand-made evaluation points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from encore_fast.eval.intervals import (
    Estimate,
    bootstrap,
    bootstrap_pvalue,
    holm,
    mean,
    paired_difference,
    proportion,
    wilson,
)
from encore_fast.eval.protocol import (
    Point,
    collapse_point,
    collapse_reasons,
    informative_tasks,
    majority_levels,
    scored_facts,
)


def hand_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(7, 10), (0, 31), (300, 300), (212, 400)])
def test_wilson_matches_the_formula(k, n):
    est = wilson(k, n)
    low, high = hand_wilson(k, n)
    assert est.value == k / n and est.n == n
    assert est.low == pytest.approx(low, abs=1e-9) and est.high == pytest.approx(high, abs=1e-9)
    assert proportion([1] * k + [0] * (n - k)).low == pytest.approx(low, abs=1e-9)


def test_bad_proportions_are_refused():
    with pytest.raises(ValueError, match="successes"):
        wilson(5, 3)
    with pytest.raises(ValueError, match="0/1"):
        proportion([0.5, 1])


def test_bootstrap_of_a_mean_matches_a_hand_resampling():
    rng = np.random.default_rng(3)
    x = rng.normal(0.6, 0.2, size=300)
    est = mean(x, resamples=4000, seed=1)
    hand = np.random.default_rng(7)
    means = np.sort([x[hand.integers(0, x.size, x.size)].mean() for _ in range(4000)])
    assert est.value == pytest.approx(x.mean())
    assert est.low == pytest.approx(np.quantile(means, 0.025), abs=0.006)
    assert est.high == pytest.approx(np.quantile(means, 0.975), abs=0.006)
    assert mean([0.5] * 20).low == 0.5 == mean([0.5] * 20).high
    assert mean(x, seed=5) == mean(x, seed=5)  # seeded: the same interval again


def test_a_paired_interval_is_narrower_on_correlated_data():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1, size=200)  # per-fact difficulty, common to both methods
    a = shared + rng.normal(0.1, 0.1, size=200)
    b = shared + rng.normal(0.0, 0.1, size=200)
    paired = paired_difference(a, b)
    unpaired = bootstrap([a, b], lambda x, y: x.mean() - y.mean(), paired=False)
    assert paired.value == pytest.approx(unpaired.value)
    assert (paired.high - paired.low) < 0.3 * (unpaired.high - unpaired.low)
    assert paired.excludes(0) and not unpaired.excludes(0)
    v, lo, hi = paired.value, paired.low, paired.high
    assert paired.format(signed=True) == f"{v:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    assert Estimate(0.05, 0.02, 0.08, 9, "x").format(signed=True) == "+0.05 [+0.02, +0.08]"
    with pytest.raises(ValueError, match="same facts"):
        paired_difference(a, b[:-1])


def test_bootstrap_pvalue_and_holm():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, size=100)
    assert bootstrap_pvalue(a, a) == 1.0
    assert bootstrap_pvalue(a + 1.0, a, resamples=999) == pytest.approx(1 / 1000)
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]  # 0.03 > 0.05 / 2 stops it
    assert holm([0.01, 0.02, 0.04]) == [True, True, True]  # 0.01<.0167, 0.02<.025, 0.04<.05
    assert holm([0.2, 0.01]) == [False, True]


def test_the_fact_sample_is_shared_and_nested():
    n = 10_000
    points = [1000, 2000, 3000, 5000, 7500, 10_000]
    samples = {e: scored_facts(n, e, seed=0) for e in points}
    assert samples[1000] == list(range(1000))  # fewer edited than the sample: all of them
    for e, s in samples.items():
        assert len(s) == 1000 and all(i < e for i in s)
        assert s == scored_facts(n, e, seed=0)  # every method gets the same facts
    for early, late in zip(points, points[1:], strict=False):
        already = {i for i in samples[late] if i < early}
        assert already <= set(samples[early])  # nested: never a fact the earlier point skipped
        assert already  # (and the later sample does reach back)
    assert scored_facts(n, 5000, seed=1) != samples[5000]
    assert scored_facts(300, 100, size=1000) == list(range(100))
    assert len(scored_facts(n, 0)) == 1000  # the unedited baseline: the stream's sample


def test_chance_levels_come_from_the_labels():
    four = [0, 1, 2, 3] * 25
    assert majority_levels(four, 4)["accuracy"] == pytest.approx(0.25)
    assert majority_levels(four, 4)["f1"] == pytest.approx(0.10)
    assert majority_levels([0, 1] * 50, 2)["f1"] == pytest.approx(1 / 3)
    skewed = majority_levels([1] * 68 + [0] * 32, 2)
    assert skewed["label"] == 1 and skewed["accuracy"] == pytest.approx(0.68)
    assert skewed["f1"] == pytest.approx(0.68 * 2 * 0.68 / 1.68)


def est(value, low, high):
    return Estimate(value, low, high, 400, "bootstrap")


def test_informative_tasks_lie_above_their_majority_level():
    unedited = {"sst2": est(0.84, 0.80, 0.88), "mrpc": est(0.56, 0.50, 0.61),
                "cola": est(0.58, 0.57, 0.60)}
    chance = {"sst2": 1 / 3, "mrpc": 0.55, "cola": 0.58}
    assert informative_tasks(unedited, chance) == ["sst2"]


def test_collapse_needs_two_evaluations_in_a_row():
    base = Point(0, 20.0, est(0.60, 0.55, 0.65), 0.40)
    ok, low = est(0.5, 0.45, 0.55), est(0.42, 0.38, 0.46)
    points = [base, Point(1000, 25.0, low, 0.40), Point(2000, 30.0, ok, 0.40),
              Point(3000, 40.0, low, 0.40), Point(4000, 50.0, low, 0.40)]
    assert collapse_reasons(points[1], base) and not collapse_reasons(points[2], base)
    assert collapse_point(points) == 3000
    assert collapse_point(points[:4]) is None  # one collapsed point is not enough


def test_collapse_by_perplexity_alone():
    base = Point(0, 20.0, None, None)
    points = [base, Point(1000, 199.0, None, None), Point(2000, 200.0, None, None),
              Point(3000, 300.0, None, None)]
    assert collapse_reasons(points[1], base) == []
    assert collapse_reasons(points[2], base) == ["perplexity x10.0 >= x10"]
    assert collapse_point(points) == 2000


def test_every_result_is_stamped_by_one_helper(tmp_path):
    import subprocess

    from encore_fast.provenance import git_commit, stamp, stamp_columns

    s = stamp(["bench.py", "--n", "20"])
    assert s["command"] == "bench.py --n 20"
    assert set(s["versions"]) >= {"python", "torch", "transformers", "scipy"}
    assert s["machine"] and s["date"].endswith("+00:00")
    assert len(s["commit"].removesuffix("+dirty")) == 40 or s["commit"] == "unknown"
    cols = stamp_columns(s)
    assert cols["v_torch"] == s["versions"]["torch"] and cols["command"] == s["command"]
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("a")
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = git_commit(tmp_path)
    (tmp_path / "f").write_text("b")
    assert git_commit(tmp_path) == clean + "+dirty"


def _git(*args: str) -> str:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no git history here (git {args[0]}: {done.stderr.strip()[:80]})")
    return done.stdout


def test_collapse_rule_was_committed_before_the_first_study_result():
    """The rule the study's results are judged by, with its test, is in the history before the
    first commit of a result of the study, and has not changed since."""
    import inspect

    from encore_fast.eval import protocol

    first = _git("log", "--reverse", "--format=%H", "--",
                 "benchmarks/results/study2-smollm2").split()
    if not first:
        pytest.skip("no study result in this history (a shallow clone?)")
    parent = _git("rev-parse", f"{first[0]}^").strip()
    then = _git("show", f"{parent}:encore_fast/eval/protocol.py")
    for part in (protocol.collapse_reasons, protocol.collapse_point):
        assert inspect.getsource(part) in then, f"{part.__name__} changed after the first result"
    for line in ("PPL_FACTOR = 10.0", "IN_A_ROW = 2"):
        assert line in then and line in inspect.getsource(protocol)
    assert "def test_collapse_needs_two_evaluations_in_a_row" in _git(
        "show", f"{parent}:tests/test_protocol.py")


@pytest.mark.parametrize(("n", "size", "seed"), [(1, 1, 0), (7, 3, 0), (40, 5, 1), (300, 30, 2)])
def test_ever_scored_is_the_union_of_every_points_sample(n, size, seed):
    from encore_fast.eval.protocol import ever_scored

    union = set()
    for edits in range(n + 1):
        union |= set(scored_facts(n, edits, size, seed))
    assert ever_scored(n, size, seed) == sorted(union)
    assert len(union) > size or n <= size  # (more than one evaluation's sample)
