"""The statistics pass with 1 and 2 processes (gloo, CPU), and what data-parallel editing sends.

    python benchmarks/bench_distributed.py --texts 200 --out benchmarks/results/distributed_cpu.csv

SmolLM2-135M, ``C0`` of layers 4-8 over the first ``--texts`` WikiText-2 validation paragraphs
(max 256 tokens), first in one process, then in ``--world`` spawned processes of one thread
each (each rank its share of the texts, one ``all_reduce``). Every process uses one thread, so
the ratio is the one of adding a device, not of splitting a CPU's threads. Prints both times,
the speed-up, the largest difference between the two ``C0``, and the bytes data-parallel
editing communicates per batch (from the shapes: the gathered values, the broadcast factors)
for SmolLM2-135M and for Llama3-8B.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import torch
from csv_rows import append_rows

from encore_fast.distributed import free_port
from encore_fast.machine import cpu_model

LAYERS = [4, 5, 6, 7, 8]
SHAPES = {  # d_model, d_ff (the edited matrix is d_ff -> d_model), edited layers, batch
    "smollm2-135m": (576, 1536, 5, 50),
    "llama3-8b": (4096, 14336, 5, 100),
}


def comm_bytes(d_model: int, d_ff: int, n_layers: int, batch: int) -> dict[str, int]:
    """Bytes per batch of data-parallel editing, and once for the statistics pass.

    values: every rank's ``z`` and ``h0`` (fp32 ``[d_model]`` each per request) gathered to all;
    update: rank 0 broadcasts per layer ``U [d_model, n]``, ``V [d_ff, n]`` and the keys
    ``K [d_ff, n]`` (fp32); statistics: one all_reduce of ``C0 [d_ff, d_ff]`` fp32 per layer."""
    values = 2 * batch * d_model * 4
    update = n_layers * (d_model + 2 * d_ff) * batch * 4
    return dict(values=values, update=update, per_batch=values + update,
                stats_all_reduce=n_layers * d_ff * d_ff * 4)


def _stats(texts: list[str], group: Any) -> dict[int, torch.Tensor]:
    from encore_fast.models import ModelView, load_model
    from encore_fast.models.fingerprint import model_fingerprint
    from encore_fast.stats import second_moments

    model, tok = load_model(None)
    return second_moments(ModelView(model), tok, LAYERS, texts, n_samples=len(texts),
                          max_length=256, fingerprint=model_fingerprint(model), cache=False,
                          progress=False, group=group)


def _rank(rank: int, world: int, port: int, texts: list[str], out: str) -> None:
    import torch.distributed as dist

    from encore_fast.distributed import resolve_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=30))
    dist.barrier()
    t0 = time.perf_counter()
    c0 = _stats(texts, resolve_group())
    seconds = time.perf_counter() - t0
    if rank == 0:
        torch.save({"c0": c0, "seconds": seconds}, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--texts", type=int, default=200, help="WikiText-2 paragraphs for C0")
    p.add_argument("--world", type=int, default=2, help="processes of the distributed pass")
    p.add_argument("--out", default=None, help="CSV file to append the row to")
    args = p.parse_args(argv)
    from encore_fast.paths import default_corpus
    from encore_fast.stats import load_corpus

    corpus = default_corpus()
    if corpus is None:
        print("error: no WikiText-2 (set ENCORE_FAST_DATA)", file=sys.stderr)
        return 2
    texts, _ = load_corpus(corpus, args.texts)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    single = _stats(texts, None)
    t_one = time.perf_counter() - t0

    out = Path(f"/tmp/bench_distributed_{free_port()}.pt")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, texts, str(out)))
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        print(f"error: a rank failed (exit codes {[proc.exitcode for proc in procs]})",
              file=sys.stderr)
        return 1
    dist_run = torch.load(out)
    out.unlink()
    t_many = dist_run["seconds"]
    diff = max(float((dist_run["c0"][l] - single[l]).abs().max() / single[l].abs().max())
               for l in LAYERS)
    print(f"C0 over {len(texts)} texts, layers {LAYERS}: 1 process {t_one:.1f} s, "
          f"{args.world} processes {t_many:.1f} s ({t_one / t_many:.2f}x); "
          f"max |C0_dist - C0| / max |C0| = {diff:.2e}")
    for name, shape in SHAPES.items():
        b = comm_bytes(*shape)
        print(f"{name} (batch {shape[3]}, {shape[2]} layers): per batch {b['values'] / 1e6:.2f} "
              f"MB values + {b['update'] / 1e6:.2f} MB update = {b['per_batch'] / 1e6:.2f} MB; "
              f"statistics all_reduce once {b['stats_all_reduce'] / 1e6:.0f} MB")
    if args.out:
        b = comm_bytes(*SHAPES["smollm2-135m"])
        append_rows(args.out, ["date", "cpu", "texts", "world", "one_process_s",
                               "distributed_s", "speedup", "max_rel_diff",
                               "smollm2_batch_bytes"],
                    [[datetime.date.today().isoformat(), cpu_model(), len(texts), args.world,
                      round(t_one, 2), round(t_many, 2), round(t_one / t_many, 3), diff,
                      b["per_batch"]]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
