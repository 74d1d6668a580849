"""BLAS threads of a host-backend fleet: K lanes share the machine's cores instead of each asking for all of them.

Rules:

* On the host backend each lane trains on its own worker thread, and every
  matrix product of a lane's numpy asks the BLAS library (OpenBLAS, MKL, BLIS)
  for its pool of threads, one per core by default: K lanes training at once
  run K x cores threads on the cores, and contend (the fleet bench measured
  K = 4 on 2 cores at 0.85x one lane with the defaults, 1.73x with one BLAS
  thread a process, at the same CPU seconds).
* A BLAS library's thread count is one setting of the process, not of a
  thread, so the cap is the process's: ``max(1, cores // K)`` threads, cores
  being those this process may run on. It is applied for the fleet's run and
  lifted (the library's earlier settings restored) when the run ends.
* One lane, or a device that does not train with numpy (cupy), changes
  nothing.
* :mod:`threadpoolctl` finds and sets every BLAS library numpy and the
  trainers loaded, by each library's own API (each names and scopes its
  setter differently: ``openblas_set_num_threads``, the scipy-openblas
  builds' suffixed symbols, MKL's domains): not code to keep by hand here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from threadpoolctl import threadpool_info, threadpool_limits  # type: ignore[import-untyped]


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def threads_per_lane(lanes: int, cores: int) -> int:
    """BLAS threads each of ``lanes`` lanes training at once gets on ``cores`` cores (at least one)."""
    return max(1, cores // max(1, lanes))


def blas_threads() -> dict[str, int]:
    """The thread count of each BLAS library loaded in this process, by its file."""
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@contextlib.contextmanager
def cap_blas_threads(lanes: int, log: logging.Logger | None = None, *, cores: int | None = None) -> Iterator[int | None]:
    """Within the block, BLAS libraries run :func:`threads_per_lane` threads (None yielded: one lane, nothing capped)."""
    if lanes < 2:
        yield None
        return
    cores = cores or usable_cores()
    n = threads_per_lane(lanes, cores)
    with threadpool_limits(limits=n, user_api="blas"):
        if log is not None:
            log.info("BLAS threads capped at %d for %d lanes on %d cores (lifted at the run's end)", n, lanes, cores)
        yield n
