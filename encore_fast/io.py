"""Files written whole or not at all, and checksums of what is read back.

One helper per job: :func:`atomic_save` for safetensors files (caches, edits, checkpoints),
:func:`atomic_write_text` for JSON and text, :func:`tensors_digest` for the checksum stored in
a file's metadata and compared when it is read (a file damaged after a valid header would
otherwise load silently).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def _tmp_path(path: Path) -> Path:
    """This process's temporary file for ``path`` (clearing those of writers that are gone)."""
    clear_stale_temporaries(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def clear_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of earlier writes of ``path`` whose writer process no longer
    runs (a save killed mid-write leaves one); returns those removed. A live writer's file,
    and this process's own, are left alone."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name[len(f".{path.name}.tmp"):]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process: alive)
        return True
    return True


def atomic_save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                meta: Mapping[str, str]) -> Path:
    """Write a safetensors file to a temporary name in the same folder, fsync it, then
    ``os.replace`` it over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(meta))
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_save` does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and raw bytes of ``tensors``, in name
    order: the checksum a file stores for its tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
