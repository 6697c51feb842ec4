"""Batch rows on Ray actors: one worker per GPU (or per CPU share with `workers`), each a
imagegen.batch.RowRunner that loads its pipeline once and generates many rows.

The driver keeps every worker two rows deep (no idle gap between rows) and writes every outcome itself.
A worker that dies (crash, OOM kill, lost node) is replaced and the rows it held go back to the front
of the queue; a row whose worker died running it more than `max_retries` times goes to failures.jsonl.
A row is written only when a worker returned it, so no row is lost or written twice. Workers that
cannot even start (a plugin that fails to import) stop the batch with that error.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, OutOfMemoryError, RayActorError

from ..batch import LoadOptions, Outputs, Row, RowOutcome, RowRunner, encoded, error_text
from ..batch_ranks import RankedRowRunner, RanksEnded
from ..errors import ImagegenError
from . import PluginRef, connect, forwarded_plugins, runtime_env, setup_worker

ROWS_IN_FLIGHT = 2  # per worker: one row generates while the one before it is encoded (or waits its turn)
WORKER_LOST = (RayActorError, OutOfMemoryError, ActorUnschedulableError)


class BatchWorker:
    """The Ray actor: the driver's in-process plugins, then a RowRunner (over `gpus` ranks it launches when
    `gpus` > 1: imagegen.batch_ranks). It takes ROWS_IN_FLIGHT calls at once (a threaded actor) so a row's PNG
    is encoded while the next row generates, as the local Writer does; the generations themselves run one after
    another on one thread of their own (MLX work, or the ranks' connection, stays on one thread), in the order
    the driver sent them (`turn`: Ray starts a threaded actor's calls in any order), as Pool's accounting of a
    dead worker's rows assumes."""

    def __init__(self, load: LoadOptions, plugins: list[PluginRef], gpus: int = 1):
        setup_worker(plugins)
        self.runner = RankedRowRunner(load, gpus) if gpus > 1 else RowRunner(load)
        self.device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagegen-device")
        self.turns = threading.Condition()
        self.next_turn = 0

    def run(self, row: Row, turn: int) -> RowOutcome:
        """Generate `row` once the rows sent before it (turns 0 .. turn - 1 of this actor) have started."""
        with self.turns:
            self.turns.wait_for(lambda: self.next_turn == turn)
            generation = self.device.submit(self.runner.generate, row)
            self.next_turn += 1
            self.turns.notify_all()
        try:
            generated = generation.result()
        except RanksEnded:  # this actor cannot generate any more: end it, so the pool replaces it
            os._exit(1)
        return encoded(generated)


def _share(total: float, count: int) -> float:
    """An equal share of a resource that Ray accepts: whole units above one, 1/10000ths below."""
    share = total / count
    return float(int(share)) if share >= 1 else math.floor(share * 10000) / 10000


def worker_resources(workers: int | None, gpus_per_worker: int = 1) -> tuple[int, dict[str, float]]:
    """How many workers and what each reserves: one GPU each by default (`gpus_per_worker` each when more,
    Ray's num_gpus); without GPUs, `workers` (default 1) equal shares of the CPUs."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker > 1 and gpus >= 1:
        if gpus < gpus_per_worker:
            raise ImagegenError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has {gpus:g} GPU(s).")
        count = workers or int(gpus // gpus_per_worker)
        return count, {"num_gpus": float(gpus_per_worker), "num_cpus": min(1.0, _share(cpus, count))}
    if gpus >= 1:
        count = workers or int(gpus)
        return count, {"num_gpus": min(1.0, _share(gpus, count)), "num_cpus": min(1.0, _share(cpus, count))}
    count = workers or 1
    return count, {"num_cpus": _share(cpus, count)}


@dataclass(frozen=True)
class Task:
    """A row sent to a worker: which slot, and which actor of that slot (its generation)."""

    slot: int
    generation: int
    row: Row


class Pool:
    """The worker slots and the rows they hold. A slot's actor is replaced when it dies (its generation counts
    up). A death counts against a row only when the dead actor held no other row that had not come back: an actor
    generates its rows in order, but the row before the one it was generating may still be on its way back, so
    with two rows out neither is known to have killed it. Both then go again alone, one per worker with nothing
    else in flight there (`suspects`), and the next death is certain; rows queued behind a row that kills
    workers are never failed with it."""

    def __init__(self, count: int, options: dict[str, Any], load: LoadOptions, gpus_per_worker: int = 1):
        env = runtime_env()
        self.actor_class = ray.remote(BatchWorker).options(
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=ROWS_IN_FLIGHT,
            **options,
            **({"runtime_env": env} if env else {}),
        )
        self.load, self.plugins, self.gpus_per_worker = load, forwarded_plugins(), gpus_per_worker
        self.actors = [self._new() for _ in range(count)]
        self.generations = [0] * count
        self.turns = [0] * count  # rows sent to each slot's current actor
        self.in_flight: dict[Any, Task] = {}  # ObjectRef -> Task, in the order sent
        self.culprits: dict[tuple[int, int], str | None] = {}  # (slot, generation) of a dead actor -> the row it ran
        self.suspects: set[str] = set()  # rows a worker died holding alongside another: they run alone

    def _new(self) -> Any:
        return self.actor_class.remote(self.load, self.plugins, self.gpus_per_worker)

    def held(self, slot: int) -> list[Task]:
        return [t for t in self.in_flight.values() if (t.slot, t.generation) == (slot, self.generations[slot])]

    def takes(self, slot: int, row: Row) -> bool:
        """Whether `slot` may take `row` now: a suspect only an idle worker, any other row a worker with room
        that holds no suspect."""
        held = self.held(slot)
        if row.id in self.suspects:
            return not held
        return len(held) < ROWS_IN_FLIGHT and not any(t.row.id in self.suspects for t in held)

    def send(self, queue: deque[Row]) -> None:
        """Keep every worker ROWS_IN_FLIGHT rows deep (in the queue's order: a suspect waits for an idle worker)."""
        while queue:
            slots = [s for s in range(len(self.actors)) if self.takes(s, queue[0])]
            if not slots:
                return
            slot = min(slots, key=lambda s: len(self.held(s)))
            row = queue.popleft()
            ref = self.actors[slot].run.remote(row, self.turns[slot])
            self.in_flight[ref] = Task(slot, self.generations[slot], row)
            self.turns[slot] += 1

    def next_done(self) -> tuple[Task, Any]:
        """The next task to come back (the oldest first among those ready) and its ObjectRef."""
        (ref,), _ = ray.wait(list(self.in_flight), num_returns=1)
        return self.in_flight.pop(ref), ref

    def lost(self, task: Task) -> bool:
        """A task's worker died: replace it (on the first of its tasks to tell); True if this task's row killed
        it: the one row of the actor that did not come back (a row whose result came back before the death, even
        if the driver has not read it yet, was not running). With several, none is blamed and all become
        suspects."""
        key = (task.slot, task.generation)
        if key not in self.culprits:
            mates = [ref for ref, t in self.in_flight.items() if (t.slot, t.generation) == key]
            unfinished = [task, *(self.in_flight[ref] for ref in mates if not _came_back(ref))]
            self.culprits[key] = task.row.id if len(unfinished) == 1 else None
            if len(unfinished) > 1:
                self.suspects.update(t.row.id for t in unfinished)
            ray.kill(self.actors[task.slot], no_restart=True)
            self.actors[task.slot] = self._new()
            self.generations[task.slot] += 1
            self.turns[task.slot] = 0
        return self.culprits[key] == task.row.id

    def ended(self, row: Row) -> None:
        """`row` is written (an image or a failure): it is no longer a suspect."""
        self.suspects.discard(row.id)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _came_back(ref: Any) -> bool:
    """Whether a task of a dead actor returned before the actor died (its tasks all resolve once it is dead)."""
    try:
        ray.get(ref)
    except WORKER_LOST:
        return False
    except ray.exceptions.RayError:  # it came back, with an error of its own
        pass
    return True


def run_on_ray(
    rows: Sequence[Row],
    outputs: Outputs,
    load: LoadOptions,
    address: str | None,
    workers: int | None = None,
    max_retries: int = 2,
    rejected: Iterable[RowOutcome] = (),
    gpus_per_worker: int = 1,
) -> None:
    """Generate `rows` on a Ray cluster (see imagegen.scaleout.connect for `address`), each worker over
    `gpus_per_worker` GPUs."""
    started = connect(address, quiet=True)
    pool: Pool | None = None
    try:
        count, options = worker_resources(workers, gpus_per_worker)
        pool = Pool(count, options, load, gpus_per_worker)
        outputs.start(count, rejected)
        queue = deque(rows)
        deaths: dict[str, int] = {}  # row id -> workers that died running it
        while queue or pool.in_flight:
            pool.send(queue)
            task, ref = pool.next_done()
            try:
                outcome = ray.get(ref)
            except WORKER_LOST as e:
                if getattr(e, "actor_init_failed", False):  # every new worker would fail the same way
                    cause = str(e).strip().splitlines()[-1]  # the last line of the worker's traceback
                    raise ImagegenError(f"Ray workers cannot start: {cause}") from None
                replaced = (task.slot, task.generation) not in pool.culprits
                if pool.lost(task):
                    deaths[task.row.id] = deaths.get(task.row.id, 0) + 1
                if replaced:
                    outputs.summary.replaced += 1
                    outputs.note(f"worker {task.slot} died ({type(e).__name__}); replaced, its rows go again")
                if deaths.get(task.row.id, 0) > max_retries:
                    outputs.finish(
                        RowOutcome(task.row, "", error=f"its worker died {deaths[task.row.id]} times ({error_text(e)})")
                    )
                    pool.ended(task.row)
                else:
                    queue.appendleft(task.row)
                    outputs.summary.retried += 1
                continue
            except ray.exceptions.RayError as e:  # the row's outcome could not come back (e.g. not picklable)
                outcome = RowOutcome(task.row, "", error=error_text(e))
            outputs.finish(outcome)
            pool.ended(task.row)
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()
