"""Every architecture fact the editor needs, in one place.

For each supported model family: where the decoder blocks are, which matrix is edited (the
MLP output projection), which other linear modules a method may edit (``linears``: the MLP's
gate and up projections), whether their weights are stored transposed (GPT-2's Conv1D), and
where the final norm and the LM head are. Anything else can be described by hand with
:class:`ArchSpec`.

An edited matrix is a *site*: an ``int`` is the MLP output projection of that block (what the
MEMIT family edits); ``"NAME.LAYER"`` (``"mlp_gate.10"``) is the module ``linears[NAME]`` of
that block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from encore_fast.models.placement import execution_device, input_device, stored_tensor


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (dotted, relative to the model) for one architecture.

    ``mlp_out`` is relative to a decoder block. ``transposed`` means the edited weight is
    stored as ``[d_in, d_out]`` (``W_stored = Wᵀ``), as GPT-2's ``Conv1D`` does. ``linears``:
    other editable linear modules of a block, ``(name, path)`` pairs (``"mlp_gate"``,
    ``"mlp_up"``), stored like ``mlp_out``.
    """

    blocks: str
    mlp_out: str
    final_norm: str
    lm_head: str
    transposed: bool = False
    linears: tuple[tuple[str, str], ...] = ()


Site = int | str
"""An edited matrix: a block's MLP output projection (``int``), or ``"NAME.LAYER"``."""


def site_from_text(text: str) -> Site:
    """A site written as text (a JSON key): ``"7"`` is the MLP output of block 7."""
    return int(text) if text.isdigit() else text


def site_order(site: Site) -> tuple[int, str, int]:
    """Sorting key for sites: MLP outputs by layer, then named sites by name and layer."""
    if isinstance(site, int):
        return (0, "", site)
    name, _, layer = site.rpartition(".")
    return (1, name, int(layer) if layer.isdigit() else -1)

_LLAMA = ArchSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head",
                  linears=(("mlp_gate", "mlp.gate_proj"), ("mlp_up", "mlp.up_proj")))

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": ArchSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head"),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", True,
                     linears=(("mlp_up", "mlp.c_fc"),)),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head",
                     linears=(("mlp_up", "mlp.fc_in"),)),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm",
                         "lm_head", linears=(("mlp_up", "mlp.dense_h_to_4h"),)),
    # (transformers < 5 called the last one's head "embed_out")
}


def detect_arch(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` for ``model``, from its config's ``model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ValueError(
        f"unknown architecture {model_type!r} ({type(model).__name__}); supported: "
        f"{', '.join(sorted(ARCHITECTURES))}. Pass arch=ArchSpec(blocks=..., mlp_out=..., "
        "final_norm=..., lm_head=..., transposed=...) to describe it."
    )


class ModelView:
    """A model seen through its :class:`ArchSpec`: blocks, edited weights, norm and head."""

    def __init__(self, model: nn.Module, arch: ArchSpec | None = None) -> None:
        self.model = model
        self.arch = arch or detect_arch(model)
        try:
            blocks = model.get_submodule(self.arch.blocks)
            self.final_norm = model.get_submodule(self.arch.final_norm)
            try:
                self.lm_head = model.get_submodule(self.arch.lm_head)
            except AttributeError:
                head = model.get_output_embeddings() if hasattr(
                    model, "get_output_embeddings") else None
                if head is None:
                    raise
                self.lm_head = head
        except AttributeError as exc:
            raise ValueError(
                f"model {type(model).__name__} does not match {self.arch}: {exc}") from exc
        self.blocks = list(blocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def block_name(self, layer: int) -> str:
        return f"{self.arch.blocks}.{layer}"

    def mlp_out(self, layer: int) -> nn.Module:
        """The edited module (MLP output projection) of ``layer``."""
        self._check_layer(layer)
        return self.blocks[layer].get_submodule(self.arch.mlp_out)

    def linear(self, site: Site) -> nn.Module:
        """The module of an edited ``site``: ``layer`` (the MLP output) or ``"NAME.LAYER"``."""
        if isinstance(site, int):
            return self.mlp_out(site)
        name, _, layer = str(site).rpartition(".")
        paths = dict(self.arch.linears)
        if name not in paths or not layer.isdigit():
            raise ValueError(f"site {site!r}: expected a layer number or NAME.LAYER with NAME "
                             f"one of {sorted(paths)} (this architecture's linears)")
        self._check_layer(int(layer))
        return self.blocks[int(layer)].get_submodule(paths[name])

    def weight(self, layer: Site) -> torch.Tensor:
        """The edited weight as stored (``[d_out, d_in]``, or ``[d_in, d_out]`` if transposed);
        for a layer accelerate offloaded to CPU, the stored tensor its hook loads from."""
        return stored_tensor(self.linear(layer), "weight")

    def layer_device(self, layer: Site) -> torch.device:
        """The device ``layer``'s edited matrix computes on (its keys and solver state live
        there): that of its weight, or its accelerate hook's execution device."""
        return execution_device(self.linear(layer))

    def weight_out_in(self, layer: Site) -> torch.Tensor:
        """The edited weight as a ``[d_out, d_in]`` view (no copy)."""
        w = self.weight(layer)
        return w.t() if self.arch.transposed else w

    def d_in(self, layer: Site) -> int:
        return self.weight_out_in(layer).shape[1]

    @property
    def d_model(self) -> int:
        return self.weight_out_in(0).shape[0]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer {layer} out of range: the model has {len(self.blocks)} blocks")

    @property
    def backbone(self) -> nn.Module:
        """The model without its LM head (``model.base_model``: embeddings, blocks, norm)."""
        return self.model.base_model

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-capping (Gemma 2), or None."""
        return getattr(self.model.config, "final_logit_softcapping", None) or None

    @property
    def sliding_window(self) -> int | None:
        """The attention's sliding window in tokens, or None."""
        window = getattr(self.model.config, "sliding_window", None)
        return window if isinstance(window, int) else None

    @contextlib.contextmanager
    def attention_implementation(self, name: str) -> Iterator[None]:
        """Route the model's attention through the registered implementation ``name``
        (restored on exit, also on errors)."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = before

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (that of its first parameter)."""
        return next(self.model.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        """``"float32"``, ``"bfloat16"``, ...: the dtype as messages and cache names spell it."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go: the input embeddings' (execution) device."""
        return input_device(self.model)


def block_hidden(output: object) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's output (a tensor, or a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output)}")


def replace_block_hidden(output: object, hidden: torch.Tensor) -> object:
    """Return ``output`` with its hidden states replaced (same container type)."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot replace the hidden states in a block output of type {type(output)}")


class StandIn(nn.Module):
    """Replaces a block during the steps: returns ``hidden`` (or its input) in the block's
    output format, without computing anything."""

    def __init__(self, block: nn.Module, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.hidden: torch.Tensor | None = None
        if hasattr(block, "attention_type"):  # read by some models' mask selection
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.hidden if self.hidden is not None else hidden_states
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def stand_ins(view: ModelView, upto: int, as_tuple: bool) -> Iterator[list[StandIn]]:
    """Replace blocks ``0..upto`` by :class:`StandIn` modules (restored on exit): the caller
    sets ``hidden`` on the last one to what block ``upto`` would output."""
    container = view.model.get_submodule(view.arch.blocks)
    originals = [container[i] for i in range(upto + 1)]
    stand_ins = [StandIn(b, as_tuple) for b in originals]
    try:
        for i, s in enumerate(stand_ins):
            container[i] = s
        yield stand_ins
    finally:
        for i, b in enumerate(originals):
            container[i] = b
