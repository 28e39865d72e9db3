"""Editing across processes with ``torch.distributed`` (launched with ``torchrun``).

The editor needs few collectives: the statistics pass sums every rank's second moments
(``all_reduce``), a batch's values are optimised in shares and gathered, and rank 0's update
of each batch is broadcast so every rank applies the very same factors. :class:`Group` wraps
them so that they fail together: a rank whose own work raised tells the others at the next
collective (:meth:`Group.agree`), and they raise :class:`DistributedError` naming it instead of
waiting for it forever; a rank that died outright ends the others' collectives with the
process group's ``timeout`` (set it in ``init_process_group``), turned into the same error.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from encore_fast.errors import EncoreFastError

T = TypeVar("T")


class DistributedError(EncoreFastError, RuntimeError):
    """Another rank failed (its error is in the message) or stopped answering."""


@dataclass(frozen=True)
class Group:
    """This process's place in a process group: ``rank`` of ``world`` (``pg``: the group,
    ``None`` for the default one)."""

    rank: int
    world: int
    pg: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that computes each batch's update and writes files."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (shares differ in size by at most 1)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, dist.DistBackendError) as exc:
            raise DistributedError(
                f"rank {self.rank}: {what}: the other ranks did not answer ({_first_line(exc)});"
                " one of them has probably died or run past the process group's timeout"
            ) from exc

    def gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.pg))
        return out

    def broadcast(self, obj: Any, what: str, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        box = [obj if self.rank == src else None]
        self._run(what, lambda: dist.broadcast_object_list(box, src=src, group=self.pg))
        return box[0]

    def all_reduce_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (on every rank)."""
        self._run(what, lambda: dist.all_reduce(tensor, group=self.pg))
        return tensor

    def barrier(self, what: str) -> None:
        """Wait until every rank is here."""
        self._run(what, lambda: dist.barrier(group=self.pg))

    def agree(self, error: BaseException | None, what: str) -> None:
        """Tell every rank whether this one's part of ``what`` failed; if any did, raise on
        every rank (the failed rank re-raises its own error, the others a
        :class:`DistributedError` that quotes it)."""
        reports = self.gather(None if error is None else f"{type(error).__name__}: "
                              f"{_first_line(error)}", what)
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if not failed:
            return
        if error is not None:
            raise error
        r, msg = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise DistributedError(f"rank {self.rank}: {what} failed on rank {r}{more}: {msg}")


def resolve_group(process_group: Any = None) -> Group | None:
    """The group an editor works in: ``None`` detects the default group (when
    ``torch.distributed`` is initialised with more than one process), ``False`` means a single
    process, a ``ProcessGroup`` is used as given. ``None`` is returned for one process."""
    if process_group is False or not (dist.is_available() and dist.is_initialized()):
        if process_group not in (None, False):
            raise DistributedError("a process group was given but torch.distributed is not "
                                   "initialised (call torch.distributed.init_process_group)")
        return None
    pg = None if process_group is None else process_group
    world = dist.get_world_size(pg)
    if world < 2:
        return None
    return Group(rank=dist.get_rank(pg), world=world, pg=pg)


def init_from_env(timeout_s: float = 600.0) -> Group | None:
    """Start the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in
    the environment and no group yet): nccl when CUDA is there (each rank on its
    ``LOCAL_RANK`` GPU), gloo otherwise. Returns the group, or ``None`` for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return resolve_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a local process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
