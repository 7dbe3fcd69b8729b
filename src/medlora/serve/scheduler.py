"""A bounded queue in front of one engine thread: requests wait, batch, and never run interleaved.

The queue has a fixed size (a full queue is refused at once, the HTTP layer answers 429), the worker
takes the oldest job plus waiting jobs that decode the same way, up to the engine's batch size, and
an engine error fails that batch's jobs only: the worker goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from medlora.serve.engine import Engine, Job

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The scheduler's queue holds `max_queue` jobs already."""


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="medlora-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for job in self._pending:
            job.fail("server shutting down")
        self._pending.clear()

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} requests are waiting (limit {self.max_queue})"
                )
            self._pending.append(job)
            self._cond.notify()

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            first = self._pending.popleft()
            batch = [first]
            for job in list(self._pending):
                if len(batch) >= self.engine.max_batch:
                    break
                if job.batch_key() == first.batch_key():
                    self._pending.remove(job)
                    batch.append(job)
            self._running = len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            live = []
            for job in batch:
                if job.cancelled.is_set():  # timed out or disconnected while waiting
                    job.finish("cancelled")
                else:
                    live.append(job)
            try:
                if live:
                    self.engine.run_batch(live)
            except Exception as error:  # a bug in one batch must not take the server down
                logger.exception("engine failed on a batch of %d", len(live))
                for job in live:
                    try:
                        job.fail(f"generation failed: {type(error).__name__}")
                    except Exception:  # a sink that cannot take the error must not stop the worker
                        logger.exception("could not report the failure of request %s", job.id)
            finally:
                self._running = 0
