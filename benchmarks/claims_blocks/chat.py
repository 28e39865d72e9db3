"""Edits made plain or in the chat template, each asked both ways (``chat-26/``)."""

from __future__ import annotations

from pathlib import Path

from .registry import generator, read_json, results


@generator("chat-26", reflowed=False)
def chat_template_edits(root: Path) -> str:
    """Plain vs chat-template edits, each asked both ways (``results/chat-26``)."""
    folder = results(root, "chat-26")
    data = read_json(folder / "summary.json")
    machine = data["stamp"].get("machine", "")
    return ((folder / "table.md").read_text().strip() + "\n\n"
            f"200 CounterFact edits (`counterfact-edit.json` records 0–199, 2 batches of 100, "
            f"ENCORE, preset `smollm2-135m`, bf16 + masters) of the bundled "
            f"SmolLM2-135M-Instruct; ES = P(new) > P(true), teacher-forced, with Wilson 95% "
            f"intervals and paired bootstrap differences over the same facts "
            f"(`bash scripts/chat26.sh; python benchmarks/chat26_report.py`; {machine}).")
