"""The orchestrator's hop buffers: fresh staging per hop, prepared ahead; one private buffer reused.

Rules:

* Staging is **fresh per hop**: a buffer is exported for the first time in the
  grant that names it, and never again. The next hop's staging may be
  allocated while the current hop trains (on a worker thread), because no
  grant has named it yet.
* The private buffer that plaintext lands in is never exported, so once
  scrubbed and verified zero it may serve the next hop (a fresh one costs a
  page fault per 4 KiB on the host backend). The first hop's private buffer
  and staging are made while the orchestrator waits for its holders.
* A staging a holder may still map (prepared for a guess that was wrong) is
  scrubbed, then freed only once that holder is known to have let go of it
  (:meth:`StagingPool.free_retired`, on its ack of a later grant), where the
  device cannot free memory under another process's mapping (cupy: undefined
  in CUDA). At most :data:`MAX_RETIRED` wait; the oldest is freed beyond that.
* Every staging export alive right now is listed in ``<state>/inflight-staging``
  where exports outlive the process (the device says so), so a restart after
  kill -9 removes what the dead process could not. Where they do not, no such
  file is written: a handle names a live capability, and a file of them would
  hand it to anyone who reads it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from pathlib import Path
from typing import Any

from gtbus.gpu.device import Device

INFLIGHT_FILE = "inflight-staging"
#: Stagings kept after their wrong guess until their holder lets go (each is one hop's staging, up to a chunk).
MAX_RETIRED = 4


class StagingPool:
    """Takes, prepares and releases one orchestrator's hop buffers on ``device``."""

    def __init__(self, device: Device, state_dir: Path, log: logging.Logger | None = None) -> None:
        self.device = device
        self.inflight_path = state_dir / INFLIGHT_FILE
        self.log = log or logging.getLogger("gtbus.staging")
        self._spare_private: Any = None
        self._live_exports: set[str] = set()
        self._lock = threading.Lock()  # the next hop's staging is allocated on another thread
        self._next: tuple[int, concurrent.futures.Future[tuple[Any, Any]]] | None = None
        self._retired: list[tuple[str, Any, Any]] = []  # (holder, buffer, handle), oldest first
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gtbus-staging")

    # -- the private buffer ----------------------------------------------------------------

    def take_private(self, nbytes: int) -> Any:
        """A private (never exported) buffer of ``nbytes``: the spare if it fits, else a new one."""
        buf, self._spare_private = self._spare_private, None
        if buf is not None and buf.nbytes == nbytes:
            return buf
        if buf is not None:
            self.device.release(buf)
        return self.device.alloc(nbytes)

    def prepare_private(self, nbytes: int) -> None:
        """Have the private buffer allocated and touched before the first hop (a fresh one faults per 4 KiB on the host)."""
        buf = self.take_private(nbytes)
        self.device.scrub(buf)  # writes every page once: the first hop's decrypt pays no first touch
        self.keep_private(buf)

    def keep_private(self, buf: Any) -> None:
        """Keep a scrubbed, verified-zero private buffer for the next hop."""
        if self._spare_private is not None and self._spare_private is not buf:
            self.device.release(self._spare_private)
        self._spare_private = buf

    # -- staging ---------------------------------------------------------------------------

    def prepare_next(self, nbytes: int) -> None:
        """Start allocating the next hop's staging beside the current hop (nothing if one is on its way)."""
        if nbytes and self._next is None:

            def alloc() -> tuple[Any, Any]:
                buf, handle = self.device.alloc_hop_staging(nbytes)
                self.track_export(str(handle), True)
                return buf, handle

            self._next = (nbytes, self._pool.submit(alloc))

    def take_staging(self, nbytes: int) -> tuple[Any, Any]:
        """This hop's fresh staging (buffer, handle): the prepared one if it fits, else a new one.

        The export is tracked live until :meth:`track_export` says otherwise.
        """
        pending, self._next = self._next, None
        if pending is not None:
            size, fut = pending
            got = fut.result()
            if size == nbytes:
                return got
            self.release_staging(*got)
        buf, handle = self.device.alloc_hop_staging(nbytes)
        self.track_export(str(handle), True)
        return buf, handle

    def retire(self, buf: Any, handle: Any, holder: str) -> None:
        """A staging ``holder`` may still map, never to be granted: scrub it now, free it once the holder lets go.

        Freed at once where the device may free staging under a mapping.
        """
        self.device.scrub(buf)  # whatever the holder may have written before its grant: gone now
        if self.device.frees_staging_while_mapped:
            self.release_staging(buf, handle)
            return
        self._retired.append((holder, buf, handle))
        while len(self._retired) > MAX_RETIRED:
            old_holder, old_buf, old_handle = self._retired.pop(0)
            self.log.warning("freeing staging %s may still map (more than %d wait)", old_holder, MAX_RETIRED)
            self.release_staging(old_buf, old_handle)

    def free_retired(self, holder: str) -> None:
        """``holder`` has let go of every staging prepared for it before (it acked a later grant): free them."""
        keep = []
        for entry in self._retired:
            if entry[0] == holder:
                self.release_staging(entry[1], entry[2])
            else:
                keep.append(entry)
        self._retired = keep

    @property
    def retired(self) -> int:
        """Stagings waiting for their holder to let go."""
        return len(self._retired)

    def release_spares(self) -> None:
        """Release the spare private buffer, any staging prepared for a hop that never came, and the retired ones."""
        for _, buf, handle in self._retired:
            self.release_staging(buf, handle)
        self._retired = []
        if self._spare_private is not None:
            self.device.release(self._spare_private)
            self._spare_private = None
        if self._next is not None:
            _, fut = self._next
            self._next = None
            self.release_staging(*fut.result())

    def release_staging(self, buf: Any, handle: Any) -> None:
        """Release a staging buffer taken and never granted (or granted and scrubbed), and its export's tracking."""
        self.device.release(buf)
        self.track_export(str(handle), False)

    # -- exports that may outlive a crash ---------------------------------------------------

    def track_export(self, handle: str, live: bool) -> None:
        """Record that the staging export ``handle`` exists (``live``) or is gone."""
        if not getattr(self.device, "exports_outlive_process", True):
            return
        with self._lock:
            (self._live_exports.add if live else self._live_exports.discard)(handle)
            if not self._live_exports:
                self.inflight_path.unlink(missing_ok=True)
                return
            fd = os.open(self.inflight_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write("\n".join(sorted(self._live_exports)))

    def discard_inflight(self) -> None:
        """Remove the staging exports a killed predecessor left (run once, before the first hop)."""
        try:
            handles = self.inflight_path.read_text().split()
        except FileNotFoundError:
            return
        for handle in handles:
            self.device.discard_export(handle)
        self.inflight_path.unlink(missing_ok=True)
        self.log.info("removed the staging export of a hop interrupted by a restart")
