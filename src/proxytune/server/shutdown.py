"""Graceful shutdown: on SIGTERM or SIGINT the server drains before uvicorn stops listening.

uvicorn's own handler closes the listening socket at the first signal, so clients of a
draining server would see "connection refused" instead of its 503, and streams still running
at its timeout are cut mid-response. Here the first signal only puts the scheduler into
draining mode (new requests and ``/health`` answer 503 with ``Retry-After``) while in-flight
requests run to their end for up to ``timeout`` seconds; what is left then ends properly (a
stream with a ``shutting_down`` error event and ``data: [DONE]``, a waiting client with a 503
body). Only then is uvicorn told to exit. A second signal cuts the work at once; a third
exits without waiting for anything.

Exit status (``proxytune serve``): 0 when every request finished, :data:`EXIT_CUT` when the
timeout (or a second signal) cut requests.
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from .scheduler import Scheduler

log = logging.getLogger("proxytune.server")

EXIT_CUT = 3
"""``proxytune serve``'s exit status when shutting down cut in-flight requests."""

FLUSH_SECONDS = 5
"""After the drain, how long uvicorn waits for the last responses to reach their clients."""


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains ``scheduler`` on SIGTERM/SIGINT before it stops listening."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, timeout: float) -> None:
        super().__init__(config)
        self.scheduler, self.timeout = scheduler, timeout
        self.signals = 0
        self.cut = 0
        """Requests the drain cut (0 after a clean drain)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # runs in the main thread between two bytecodes: only set flags and start a thread.
        # The signal is not recorded for uvicorn to re-raise: a drained server exits normally
        self.signals += 1
        if self.signals == 1:
            log.info("draining for up to %ss (signal %d again: stop now)", self.timeout, sig)
            threading.Thread(target=self._drain, name="proxytune-drain", daemon=True).start()
        elif self.signals == 2:
            self.scheduler.hurry()
        else:
            self.should_exit = self.force_exit = True

    def _drain(self) -> None:
        try:
            self.cut = self.scheduler.close(self.timeout)
            if self.cut:
                log.warning("shutdown cut %d request(s) still running", self.cut)
        finally:  # whatever happened, the server stops
            self.should_exit = True


def run_draining(config: uvicorn.Config, scheduler: Scheduler, timeout: float) -> int:
    """Serve ``config.app`` until a signal and its drain; the exit status (0 or EXIT_CUT)."""
    config.timeout_graceful_shutdown = FLUSH_SECONDS
    server = DrainingServer(config, scheduler, timeout)
    server.run()
    return EXIT_CUT if server.cut else 0
