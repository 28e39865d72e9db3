"""Where a model's tensors live when it is split across devices (``device_map``, accelerate).

A model dispatched by accelerate (``from_pretrained(..., device_map=...)``, ``dispatch_model``,
``cpu_offload``) runs each module on its *execution device*; a module offloaded to CPU keeps its
parameters on the ``meta`` device and the real tensors in its hook's ``weights_map``, copied to
the execution device for each forward. The editor needs the real tensors (to read and update
the edited matrices) and the device each module computes on (to put its tensors there); this
module is the one place that knows how to find them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class PlacementError(ValueError):
    """A parameter the editor needs is where it cannot be edited in place (e.g. on disk)."""


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else that of
    its first parameter or buffer that is not on ``meta`` (CPU for a module without any)."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for t in _own_tensors(module):
        if t.device.type != "meta":
            return t.device
    for sub in module.modules():  # an unhooked container: its first hooked submodule's
        sub_hook = getattr(sub, "_hf_hook", None)
        if getattr(sub_hook, "execution_device", None) is not None:
            return execution_device(sub)
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' execution device."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embed if isinstance(embed, nn.Module) else model)


def stored_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of ``module`` as stored: the parameter itself, or, when accelerate
    offloaded it, the tensor in its hook's ``weights_map`` (edited in place, the next forward
    uses the edit). A disk-offloaded tensor cannot be edited in place: :class:`PlacementError`."""
    param = getattr(module, name)
    if param.device.type != "meta":
        return param
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is None:
        raise PlacementError(f"{type(module).__name__}.{name} is on the meta device and no "
                             "accelerate hook holds its values: load the model's weights first")
    first, second = weights_map[name], weights_map[name]
    if not (isinstance(first, torch.Tensor) and first.data_ptr() == second.data_ptr()):
        raise PlacementError(
            f"{type(module).__name__}.{name} is offloaded to disk (each forward reads a new "
            "copy), so an edit could not be kept; offload it to CPU, or keep the edited layers "
            "on a device (device_map)")
    return first


def stored_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter, offloaded ones as stored (:func:`stored_tensor`;
    a disk-offloaded one as read from disk)."""
    seen: set[int] = set()  # (tied weights once, as named_parameters() gives them)
    for mod_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mod_name}.{name}" if mod_name else name
            if param.device.type != "meta":
                yield full, param
                continue
            weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            yield full, (weights_map[name] if weights_map is not None else param)


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=True)
    yield from module.buffers(recurse=True)
