"""Time the six downstream tasks on the bundled SmolLM2-135M (the README's figure).

    python benchmarks/bench_downstream.py --dtype bf16 --n 100 --shots 3 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from encore_fast.eval.datasets import default_data_dir
from encore_fast.eval.downstream import evaluate_task, load_tasks
from encore_fast.models.loading import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--n", type=int, default=100, help="test examples per task")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tok = load_model(None, dtype=dtype)
    data = default_data_dir()
    if data is None:
        raise SystemExit("no shared data folder (set ENCORE_FAST_DATA)")
    total = 0.0
    for task in load_tasks(data / "downstream", shots=args.shots, n=args.n):
        t0 = time.perf_counter()
        scores = evaluate_task(model, tok, task)
        seconds = time.perf_counter() - t0
        total += seconds
        print(f"{task.spec.name:5s} {seconds:6.1f} s  f1 {scores['f1']:.3f}  mcc "
              f"{scores['mcc']:.3f}  acc {scores['acc']:.3f}")
    print(f"all six: {total:.1f} s ({args.threads} threads, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
