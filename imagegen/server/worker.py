"""The device worker: one thread runs every job, one at a time, taken from a fair queue.

Fair means round-robin over clients (the caller's address), then over the `user`s of a client, first-in
first-out within each, so one client's burst cannot starve another's single request, and a client cannot
buy extra turns by naming many users. Each client may hold only a share of the queue.
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
    """More requests are waiting than the server (or the client's share of it) accepts: 429."""

    def __init__(self, message: str, code: str = "queue_full"):
        super().__init__(message)
        self.code = code


class Cancelled(Exception):
    """The client went away; the job stops at its next check."""


class ShuttingDown(Exception):
    """The server is stopping: it takes no new jobs, and those not done within the grace period end."""


class Job:
    """Work for the device: `run(job)` executes on the worker thread; its outcome lands in `future`."""

    def __init__(
        self, client: str, run: Callable[[Job], Any], user: str = "", withdraw: Callable[[Job], None] | None = None
    ):
        self.client, self.user, self._run, self._withdraw = client, user, run, withdraw
        self.future: Future[Any] = Future()
        self.stop_reason: Exception | None = None

    @property
    def cancelled(self) -> bool:
        return self.stop_reason is not None

    def cancel(self, reason: Exception | None = None) -> None:
        """Stop the job: a waiting one leaves the queue at once (its slot is free for others), a running one
        stops at its next check; the future fails with `reason` (default Cancelled)."""
        if self.stop_reason is None:
            self.stop_reason = reason or Cancelled()
            if self._withdraw is not None:
                self._withdraw(self)

    def check(self) -> None:
        """Called between stages and steps: abandon the run if nobody waits for it any more."""
        if self.stop_reason is not None:
            raise self.stop_reason


class FairQueue:
    """Round-robin over clients, then over each client's users; FIFO within a user; thread-safe."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, OrderedDict[str, deque[Job]]] = OrderedDict()
        self._waiting: dict[str, int] = {}  # jobs per client
        self._size = 0
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, job: Job, limit: int | None = None, per_client: int | None = None) -> None:
        with self._ready:
            if limit is not None and self._size >= limit:
                raise QueueFullError(f"{self._size} requests are already waiting; try again shortly.")
            if per_client is not None and self._waiting.get(job.client, 0) >= per_client:
                raise QueueFullError(
                    f"you already have {per_client} requests waiting, the most one client may "
                    "queue; try again when one has finished.",
                    "client_queue_full",
                )
            self._clients.setdefault(job.client, OrderedDict()).setdefault(job.user, deque()).append(job)
            self._waiting[job.client] = self._waiting.get(job.client, 0) + 1
            self._size += 1
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Job | None:
        """The next job: the head of the first client's first user's line; both then move to the back."""
        with self._ready:
            if not self._size and not self._ready.wait_for(lambda: self._size > 0, timeout):
                return None
            client, users = next(iter(self._clients.items()))
            user, line = next(iter(users.items()))
            job = line.popleft()
            del users[user]
            if line:
                users[user] = line  # re-inserted at the end: the client's next user goes first
            del self._clients[client]
            if users:
                self._clients[client] = users  # the next client goes first
            self._forget(job)
            return job

    def remove(self, job: Job) -> bool:
        """Take a waiting job out of the queue; False if it is not waiting (running, or done)."""
        with self._ready:
            users = self._clients.get(job.client)
            line = users.get(job.user) if users else None
            if line is None or not any(j is job for j in line):
                return False
            line.remove(job)
            if not line:
                del users[job.user]
            if not users:
                del self._clients[job.client]
            self._forget(job)
            return True

    def jobs(self) -> list[Job]:
        with self._ready:
            return [job for users in self._clients.values() for line in users.values() for job in line]

    def _forget(self, job: Job) -> None:
        self._size -= 1
        self._waiting[job.client] -= 1
        if not self._waiting[job.client]:
            del self._waiting[job.client]


class DeviceWorker:
    """The single thread that touches the device. Jobs are submitted from any thread."""

    def __init__(
        self, max_queue: int | None = None, between: Callable[[], Any] | None = None, max_per_client: int | None = None
    ):
        self.queue = FairQueue()
        self.max_queue, self.max_per_client = max_queue, max_per_client
        self.between = between  # housekeeping after each job / idle poll
        self.running: Job | None = None
        self.draining = False
        self.counts = {"done": 0, "failed": 0, "cancelled": 0}
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagegen-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drain(self, grace: float) -> None:
        """Take no new jobs; those waiting or running have `grace` seconds, then end with ShuttingDown."""
        self.draining = True
        timer = threading.Timer(
            grace, self._give_up, ("could not finish this request within the shutdown grace period",)
        )
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.draining = True
        self._give_up("stopped before this request finished")
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, client: str, run: Callable[[Job], Any], limit: bool = True, user: str = "") -> Job:
        if self.draining:
            raise ShuttingDown("The server is shutting down and takes no new requests; retry shortly.")
        job = Job(client, run, user, withdraw=self._withdraw)
        self.queue.put(job, self.max_queue if limit else None, self.max_per_client if limit else None)
        return job

    def _give_up(self, why: str) -> None:
        reason = ShuttingDown(f"The server is shutting down and {why}; retry shortly.")
        running = self.running
        for job in [*self.queue.jobs(), *([running] if running is not None else [])]:
            job.cancel(reason)

    def _withdraw(self, job: Job) -> None:
        if self.queue.remove(job):  # still waiting: it never reaches the device
            self._count("cancelled")
            job.future.set_exception(job.stop_reason or Cancelled())

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self.counts[outcome] += 1

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
            if job.stop_reason is not None or not job.future.set_running_or_notify_cancel():
                self._count("cancelled")  # cancelled between leaving the queue and starting
                if not job.future.done():
                    job.future.set_exception(job.stop_reason or Cancelled())
                continue
            self.running = job
            try:
                job.future.set_result(job._run(job))
                self._count("done")
            except Exception as e:  # a failed generation is the caller's answer, never the worker's end
                self._count("cancelled" if e is job.stop_reason else "failed")
                job.future.set_exception(e)
            finally:
                self.running = None
