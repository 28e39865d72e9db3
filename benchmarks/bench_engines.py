"""Reference vs fast editing engine, side by side in one process, on the same requests.

    python benchmarks/bench_engines.py                          # SmolLM2-135M, CPU, batch 50
    python benchmarks/bench_engines.py --method memit --n 100 --batch-size 50
    python benchmarks/bench_engines.py --synthetic llama3-8b     # random Llama3-8B shape, bf16, GPU

Prints seconds per edit of each engine and their ratio, with the split between value
optimisation and the update, and appends a row to a CSV (``--out``). With ``--synthetic`` the
model is randomly initialised from a config (no download), the key statistics are synthetic, and
MPES and the loss cut-off are off so both engines do a fixed number of value steps.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time

import torch
from csv_rows import append_rows

from encore_fast.editor import Editor
from encore_fast.machine import describe_machine
from encore_fast.models import ModelView, load_model
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.paths import default_corpus, default_data_dir
from encore_fast.requests import EditRequest
from encore_fast.stats import second_moments

SYNTHETIC = {
    # name: (LlamaConfig kwargs, edited layers)
    "llama3-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192), [4, 5, 6, 7, 8]),
    "tiny": (dict(hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                  max_position_embeddings=512), [2, 3]),
}


def synthetic_model(name: str, device: str, dtype: torch.dtype, tokenizer: str | None = None):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from encore_fast.models import bundled_model_dir, prepare_tokenizer

    kwargs, layers = SYNTHETIC[name]
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer or bundled_model_dir()))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype).eval()
    # Synthetic C0: SPD with a spectrum like real keys (a few large directions, many small).
    stats = {}
    for layer in layers:
        d = kwargs["intermediate_size"]
        g = torch.Generator(device="cpu").manual_seed(layer)
        basis = torch.randn(d, 64, generator=g) / d**0.5
        c0 = basis @ basis.T + 1e-2 * torch.eye(d)
        stats[layer] = c0.to(device)
    return model, tok, layers, stats


def edit_requests(n: int) -> list[EditRequest] | None:
    """The first ``n`` requests of ``counterfact-edit.json`` (None, said on stderr: no data)."""
    data = default_data_dir()
    if data is None:
        print("error: no data folder (set ENCORE_FAST_DATA)", file=sys.stderr)
        return None
    records = json.loads((data / "counterfact" / "counterfact-edit.json").read_text())
    return [EditRequest.from_dict(r) for r in records[:n]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", default="encore")
    p.add_argument("--n", type=int, default=50, help="number of edits (one stream)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None)
    p.add_argument("--steps", type=int, default=None, help="value steps (synthetic default 25)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engines", default="reference,fast")
    p.add_argument("--out", default=None, help="CSV file to append a row to")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for --synthetic (default: the bundled model's)")
    args = p.parse_args(argv)

    requests = edit_requests(args.n)
    if requests is None:
        return 2

    overrides: dict = {}
    if args.synthetic:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model, tok, layers, stats = synthetic_model(args.synthetic, args.device, dtype,
                                                    args.tokenizer)
        overrides = dict(layers=layers, mpes_extra_steps=None, loss_cutoff=-1.0,
                         v_num_grad_steps=args.steps or 25)
        preset, model_label = None, f"synthetic {args.synthetic} ({dtype})"
    else:
        model, tok = load_model(None, device=args.device)
        preset, model_label = "smollm2-135m", "SmolLM2-135M (fp32)"
        layers = [4, 5, 6, 7, 8]
        corpus = default_corpus()
        stats = second_moments(ModelView(model), tok, layers, corpus, n_samples=1000,
                               max_length=256, fingerprint=model_fingerprint(model),
                               model_name="smollm2-135m", progress=False)
        if args.steps:
            overrides["v_num_grad_steps"] = args.steps

    rows = {}
    for engine in args.engines.split(","):
        ed = Editor(copy.deepcopy(model) if len(args.engines.split(",")) > 1 else model, tok,
                    args.method, preset, engine=engine, stats=stats, progress=False,
                    **overrides)
        ed.context_templates  # noqa: B018 - generated once, outside the timed region
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reports = ed.edit(requests, batch_size=args.batch_size)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        rows[engine] = dict(
            total=total, per_edit=total / len(requests),
            values=sum(r.seconds_values for r in reports) / len(requests),
            update=sum(r.seconds_update for r in reports) / len(requests),
            steps=sum(sum(r.steps) for r in reports) / len(requests),
        )
        print(f"{engine:>9}: {rows[engine]['per_edit']:.3f} s/edit "
              f"(values {rows[engine]['values']:.3f}, update {rows[engine]['update']:.3f}; "
              f"mean value updates {rows[engine]['steps']:.1f})", flush=True)
        del ed
    ratio = None
    if "reference" in rows and "fast" in rows:
        ratio = rows["reference"]["per_edit"] / rows["fast"]["per_edit"]
        print(f"speed-up fast vs reference: {ratio:.1f}x "
              f"(values {rows['reference']['values'] / rows['fast']['values']:.1f}x, "
              f"update {rows['reference']['update'] / rows['fast']['update']:.1f}x)")
    dev = describe_machine(args.device)
    print(f"device: {dev}; model: {model_label}; method {args.method}; {args.n} edits, "
          f"batch {args.batch_size}; torch {torch.__version__}")
    if args.out:
        r, fa = rows.get("reference", {}), rows.get("fast", {})
        append_rows(args.out, ["date", "device", "model", "method", "edits", "batch", "torch",
                               "ref_s_per_edit", "fast_s_per_edit", "ratio", "ref_values",
                               "fast_values", "ref_update", "fast_update"],
                    [[dt.date.today().isoformat(), dev, model_label, args.method, args.n,
                      args.batch_size, torch.__version__, r.get("per_edit"),
                      fa.get("per_edit"), ratio, r.get("values"), fa.get("values"),
                      r.get("update"), fa.get("update")]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
