"""A bounded queue in front of one engine thread: requests wait, then run; nothing runs interleaved.

The queue has a fixed size (a full queue is refused at once, the HTTP layer answers 429). One worker
thread owns the engine:
- a continuous engine (serve/continuous.py) takes waiting jobs into its running batch between
  decode steps, up to `max_batch` rows, so a request starts as soon as a row is free;
- a static engine takes the oldest job plus waiting jobs that decode the same way and runs them
  as one batch to its end.
Adapter loads and unloads (`call`) run in the same thread between steps, so no forward pass sees a
half-loaded adapter. An engine error fails the jobs it was running only: the worker goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from medlora.serve.engine import Engine, Job

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The scheduler's queue holds `max_queue` jobs already."""


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
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
            self._stopping = False
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
        if getattr(self.engine, "batching", "") == "continuous":
            self.engine.cancel_all("server shutting down")  # type: ignore[attr-defined]
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

    def call(self, task: Callable[[], Any]) -> Future[Any]:
        """Run `task` in the engine's thread between steps; its result (or error) in the future."""
        future: Future[Any] = Future()
        with self._cond:
            self._tasks.append((task, future))
            self._cond.notify()
        return future

    def waiting_for(self, model: str) -> bool:
        """Whether a queued job asked for `model` (an unload waits for those)."""
        with self._cond:
            return any(job.model == model for job in self._pending)

    # --- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        continuous = getattr(self.engine, "batching", "") == "continuous"
        while True:
            with self._cond:
                while not self._has_work(continuous):
                    self._cond.wait()
                if self._stopping:
                    return
                tasks = list(self._tasks)
                self._tasks.clear()
                jobs = self._take_jobs(continuous)
            for task, future in tasks:
                self._run_task(task, future)
            if continuous:
                self._continuous_step(jobs)
            elif jobs:
                self._static_batch(jobs)

    def _has_work(self, continuous: bool) -> bool:
        if self._stopping or self._pending or self._tasks:
            return True
        return continuous and self.engine.active > 0  # type: ignore[attr-defined]

    def _take_jobs(self, continuous: bool) -> list[Job]:
        if not self._pending:
            return []
        if continuous:
            free = self.engine.max_batch - self.engine.active  # type: ignore[attr-defined]
            return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
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

    def _run_task(self, task: Callable[[], Any], future: Future[Any]) -> None:
        try:
            result = task()
        except Exception as error:  # the task's error goes back to its caller
            future.set_exception(error)
        else:
            future.set_result(result)

    def _continuous_step(self, jobs: list[Job]) -> None:
        engine: Any = self.engine
        for job in jobs:
            if job.cancelled.is_set():  # timed out or disconnected while waiting
                job.finish("cancelled")
                continue
            try:
                engine.admit(job)
            except Exception as error:  # one bad prompt must not take the batch down
                logger.exception("engine failed to start request %s", job.id)
                self._fail([job], error)
        try:
            engine.step()
        except Exception as error:
            logger.exception("engine failed on a step of %d rows", engine.active)
            engine.cancel_all(f"generation failed: {type(error).__name__}")
        self._running = engine.active

    def _static_batch(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.cancelled.is_set():
                job.finish("cancelled")
            else:
                live.append(job)
        try:
            if live:
                self.engine.run_batch(live)
        except Exception as error:  # a bug in one batch must not take the server down
            logger.exception("engine failed on a batch of %d", len(live))
            self._fail(live, error)
        finally:
            self._running = 0

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            try:
                job.fail(f"generation failed: {type(error).__name__}")
            except Exception:  # a sink that cannot take the error must not stop the worker
                logger.exception("could not report the failure of request %s", job.id)
