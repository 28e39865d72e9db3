"""A sequential run killed mid-batch (twice, with SIGKILL) and resumed writes the very results
of an uninterrupted run: same lines, same numbers, timings aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from encore_fast.eval.run import read_results


def _run_args(tiny_dir, data_dir, out) -> list[str]:
    return ["eval", "--model", str(tiny_dir), "--out", str(out),
            "--set", "layers=[2,3]", "--set", "v_num_grad_steps=8", "--set", "stats_samples=16",
            "--set", "stats_max_length=32", "--num-edits", "24", "--batch-size", "3",
            "--eval-every", "3", "--eval-sample", "6", "--wikitext", "none",
            "--known-facts", "none", "--no-plots", "--quiet",
            "--corpus", str(data_dir / "wikitext-2" / "valid.txt"),
            "--dataset", str(data_dir / "counterfact" / "counterfact-train.json")]


def _untimed(obj):
    """A results line without its timings (the one thing a resumed run cannot repeat)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _batch_lines(path) -> int:
    if not path.exists():
        return 0
    return sum('"type": "batch"' in line for line in path.read_text().splitlines())


def test_killed_and_resumed_eval_equals_uninterrupted(tiny_dir, data_dir, tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv("ENCORE_FAST_CACHE", str(tmp_path / "cache"))
    # Both runs in subprocesses with one thread: bit-equality needs the same reduction order,
    # and an in-process run would use the test process's thread count (2 in CI).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "encore_fast.cli", *_run_args(tiny_dir, data_dir, whole)],
                   env=env, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "encore_fast.cli", *_run_args(tiny_dir, data_dir, out)]
    results = out / "results.jsonl"
    for kill_after in (2, 5):  # batch lines written when the process is killed
        resume = ["--resume"] if (out / "config.json").exists() else []
        proc = subprocess.Popen(cmd + resume, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _batch_lines(results) < kill_after and proc.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        time.sleep(0.1)  # into the next batch's value optimisation
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 0 < _batch_lines(results) < 8
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    got = [_untimed(line) for line in read_results(results)]
    want = [_untimed(line) for line in read_results(whole / "results.jsonl")]
    assert len(want) == 8 + 4  # 8 batches, evaluations at 0, 3, 6 and 8 batches
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
