"""The ranks of the distributed tests: each one a spawned process in a gloo group on the CPU.

``run_rank(rank, world, port, scenario, tiny_dir, corpus, out, requests)`` edits (or fails)
as ``scenario`` says and writes what the test compares to ``out/rank{rank}.pt``.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SETTINGS = dict(layers=[2, 3], v_num_grad_steps=4, stats_samples=16, stats_max_length=32,
                lambda_p=10.0, lambda_n=1.0)
TIMEOUT_S = 20  # the process group's: how long a rank waits for one that died
STATS_RESUME = dict(stats_samples=32)


def load_tiny(tiny_dir: str) -> tuple[Any, Any]:
    """The tiny random Llama and its tokenizer, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


METHODS = {  # scenario -> (method, settings): the new kinds of method part, across ranks
    "rect": ("memit-seq+rect", {}),
    "ultraedit": ("ultraedit", dict(gate_layers=[1], up_layers=[2], lr=0.01, group_size=3)),
    # a rule with persistent state (EvoEdit's P), a value transform and two update transforms
    "stateful": ("evoedit+nas+sphere+prune", {"alpha": 1.0, "nas.anchor": 1.0}),
}


def edit_tiny(model: Any, tok: Any, corpus: str, requests: list[dict], out: Path,
              group: Any = None, cache: Any = False, method: str = "encore",
              **over: Any) -> dict[str, Any]:
    """C0, then the requests in batches of 6; the edited weights and the steps."""
    from encore_fast.editor import Editor

    settings = SETTINGS if method == "encore" or "+" in method else {}
    ed = Editor(model, tok, method, preset=None, corpus=corpus, stats_cache=cache,
                progress=False, process_group=group, **{**settings, **over})
    c0 = {l: st.c0.clone() for l, st in ed.layer_states().items()}
    reports = ed.edit(requests, batch_size=6)
    ed.save_edits(out / "edits.safetensors")
    return dict(c0=c0, weights={l: ed.view.weight(l).detach().clone() for l in ed.sites},
                steps=[r.steps for r in reports], delta_norms=[r.delta_norms for r in reports])


def run_rank(rank: int, world: int, port: int, scenario: str, tiny_dir: str, corpus: str,
             out: str, requests: list[dict]) -> None:
    """One rank: join the group, run ``scenario``, write the outcome (or the error)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    out_dir = Path(out)
    result: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        model, tok = load_tiny(tiny_dir)
        if scenario == "raise" and rank == 1:
            def poisoned(*_args: Any) -> None:
                raise ValueError("poisoned text in rank 1's shard")
            model.model.layers[0].register_forward_pre_hook(poisoned)
        if scenario == "die" and rank == 1:
            os._exit(3)  # no error, no goodbye: the others must not wait forever
        over: dict[str, Any] = {}
        if scenario in ("interrupt", "resume"):  # 16 texts per rank: two batches of 8
            import encore_fast.stats as stats

            stats.CHECKPOINT_EVERY = 1
            over = STATS_RESUME
        if scenario == "interrupt" and rank == 1:
            calls = [0]

            def second_batch_fails(*_args: Any) -> None:
                calls[0] += 1
                if calls[0] == 2:
                    raise ValueError("interrupted in rank 1's second batch")
            model.model.layers[0].register_forward_pre_hook(second_batch_fails)
        cache = out_dir / "cache" if scenario in ("cache", "interrupt", "resume") else False
        method, settings = METHODS.get(scenario, ("encore", {}))
        result = edit_tiny(model, tok, corpus, requests, out_dir, group=None, cache=cache,
                           method=method, **over, **settings)
    except Exception as exc:
        result = dict(error=type(exc).__name__, message=str(exc),
                      trace=traceback.format_exc())
    result["seconds"] = time.monotonic() - t0
    torch.save(result, out_dir / f"rank{rank}.pt")
    if "error" not in result:
        dist.destroy_process_group()
