"""The device worker: one thread runs every job, one at a time, taken from a fair queue.

Fair means round-robin over clients (the request's `user`, else its address), first-in first-out
within each client, so one client's burst cannot starve another's single request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("imagegen.server")


class QueueFullError(Exception):
    """More requests are waiting than the server accepts (answered with 429)."""


class Cancelled(Exception):
    """The client went away; the job stops at its next step."""


class Job:
    """Work for the device: `run(job)` executes on the worker thread; its outcome lands in `future`."""

    def __init__(self, client: str, run: Callable[[Job], Any]):
        self.client, self._run = client, run
        self.future: Future[Any] = Future()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        """Called between steps: abandon the run if nobody waits for it any more."""
        if self.cancelled:
            raise Cancelled()


class FairQueue:
    """Round-robin over clients, FIFO within a client; thread-safe."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, deque[Job]] = OrderedDict()
        self._size = 0
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, job: Job, limit: int | None = None) -> None:
        with self._ready:
            if limit is not None and self._size >= limit:
                raise QueueFullError(f"{self._size} requests are already waiting; try again shortly.")
            self._clients.setdefault(job.client, deque()).append(job)
            self._size += 1
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Job | None:
        """The next job: the head of the first client's line, whose line then moves to the back."""
        with self._ready:
            if not self._size and not self._ready.wait_for(lambda: self._size > 0, timeout):
                return None
            client, line = next(iter(self._clients.items()))
            job = line.popleft()
            del self._clients[client]
            if line:
                self._clients[client] = line  # re-inserted at the end: the next client goes first
            self._size -= 1
            return job


class DeviceWorker:
    """The single thread that touches the device. Jobs are submitted from any thread."""

    def __init__(self, max_queue: int | None = None, between: Callable[[], Any] | None = None):
        self.queue = FairQueue()
        self.max_queue, self.between = max_queue, between  # between(): housekeeping after each job / idle poll
        self.running: Job | None = None
        self.counts = {"done": 0, "failed": 0, "cancelled": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagegen-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, client: str, run: Callable[[Job], Any], limit: bool = True) -> Job:
        job = Job(client, run)
        self.queue.put(job, self.max_queue if limit else None)
        return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.between is not None:
                try:
                    self.between()
                except Exception:  # housekeeping must never stop the device
                    log.exception("imagegen server: housekeeping failed")
            job = self.queue.get(timeout=0.1)
            if job is None:
                continue
            if job.cancelled or not job.future.set_running_or_notify_cancel():
                self.counts["cancelled"] += 1
                continue
            self.running = job
            try:
                job.future.set_result(job._run(job))
                self.counts["done"] += 1
            except Exception as e:  # a failed generation is the caller's answer, never the worker's end
                self.counts["cancelled" if isinstance(e, Cancelled) else "failed"] += 1
                job.future.set_exception(e)
            finally:
                self.running = None
