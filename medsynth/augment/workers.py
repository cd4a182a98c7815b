"""Where cases are made: in this process, in ``workers`` spawned processes, and/or on torchrun ranks.

Ranks shard the plan (case ``k`` belongs to rank ``k % world_size``); workers share a rank's cases.
Neither changes a byte written: every case's draws follow from ``(seed, k)``. Workers die with the
job: a killed job (even ``kill -9``) leaves no worker behind (:func:`die_with_parent`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

from medsynth.augment.case import CaseResult, JobContext, make_case
from medsynth.augment.plan import PlannedCase
from medsynth.distributed import torchrun_env
from medsynth.errors import JobError
from medsynth.progress import progress_bar


@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def join_ranks() -> Ranks:
    """Rank and world size under torchrun (:func:`medsynth.distributed.torchrun_env`); a gloo
    process group is started when there are several ranks and none exists yet."""
    env = torchrun_env()
    if not env.distributed:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            # generation on one rank can take hours while the others wait at the final barrier
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        except (RuntimeError, ValueError) as exc:
            raise JobError(f"cannot join the torchrun job (rank {env.rank} of {env.world_size}): {exc}") from None
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size())


# worker-process plumbing (spawn): the context is sent once, then only plans travel
_WORKER_CTX: JobContext | None = None
_PARENT_PID: int | None = None
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` (its parent's PID) dies, also by SIGKILL: on Linux the
    kernel sends it SIGKILL then (``prctl(PR_SET_PDEATHSIG)``); elsewhere it is checked before each
    case. If the parent is already gone (it died before this ran), exit now."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the check before each case remains
            pass
    _exit_if_orphaned(parent)


def _exit_if_orphaned(parent: int) -> None:
    if os.getppid() != parent:
        os._exit(1)  # the job is gone: nobody will collect this worker's results


def _worker_init(ctx: JobContext, parent: int) -> None:
    global _WORKER_CTX, _PARENT_PID
    die_with_parent(parent)
    _WORKER_CTX = ctx
    _PARENT_PID = parent
    if ctx.method != "synthseg":  # synthseg never imports torch: keep worker start-up light
        import torch

        torch.set_num_threads(1)


def _worker_make(plan: PlannedCase) -> CaseResult:
    if _WORKER_CTX is None or _PARENT_PID is None:
        raise JobError("augment worker used before its initialiser ran")
    _exit_if_orphaned(_PARENT_PID)
    return make_case(_WORKER_CTX, plan)


def generate(ctx: JobContext, todo: list[PlannedCase], workers: int, show: bool) -> Iterator[CaseResult]:
    """Yield the results of making ``todo`` (in process, or in ``workers`` spawned processes), each
    as soon as it is done."""
    with progress_bar(f"augment ({ctx.method})", len(todo), enabled=show) as bar:
        if workers <= 1 or len(todo) <= 1:
            for plan in todo:
                yield make_case(ctx, plan)
                bar.advance()
            return
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
            initializer=_worker_init, initargs=(ctx, os.getpid()),
        )
        try:
            pending = {pool.submit(_worker_make, plan) for plan in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield fut.result()
                    bar.advance()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
