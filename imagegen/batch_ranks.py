"""A batch worker spread over several GPUs (`imagegen batch --gpus-per-worker N`): each row's image is split over
N ranks (imagegen.distributed), which this process launches in the background and feeds one row at a time.

Rank 0 runs an ordinary imagegen.batch.Generator whose pipelines are mirrored on the other ranks
(imagegen.ranks); it receives rows from this process over a local connection and answers each with its
Generated image (or the Outcome of a failure). This process stays the batch's driver (or a Ray actor that holds
N GPUs): resuming and writing are unchanged, so every row is still written once.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
from multiprocessing.connection import Client, Connection, Listener

from . import distributed, ranks
from .batch import Generated, Generator, LoadOptions, Outcome, Row, encoded
from .errors import ImagegenError

ROWS_ENV = "IMAGEGEN_BATCH_ROWS"  # host:port:key of the process that feeds rank 0 its rows


class RanksEnded(ImagegenError):
    """The ranks stopped (one crashed or was killed): this worker cannot generate any more rows."""


class RankedGenerator:
    """Generator's interface (generate, run, close) over `count` launched ranks."""

    def __init__(self, load: LoadOptions, count: int):
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = listener.address
        self.code: int | None = None

        def run_ranks() -> None:
            argv = [sys.executable, "-m", "imagegen.batch_ranks"]
            self.code = distributed.launch(argv, count, {ROWS_ENV: f"{host}:{port}:{key.hex()}"})
            if self.connection is None:  # the ranks ended before rank 0 connected: unblock accept()
                Client((host, port), authkey=key).close()

        self.connection: Connection | None = None
        self.thread = threading.Thread(target=run_ranks, name="imagegen-batch-ranks", daemon=True)
        self.thread.start()
        with listener:
            connection = listener.accept()
        if self.code is not None:
            raise RanksEnded(f"The {count} ranks of a batch worker ended at start (exit code {self.code}).")
        self.connection = connection
        connection.send(load)

    def generate(self, row: Row) -> Generated | Outcome:
        """One row on the ranks: its image, or the outcome of its failure."""
        try:
            self.connection.send(row)
            return self.connection.recv()
        except (EOFError, OSError):
            self.thread.join()
            raise RanksEnded(f"The ranks of this batch worker ended (exit code {self.code}).") from None

    def run(self, row: Row) -> Outcome:
        return encoded(self.generate(row))

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.send(None)  # rank 0 ends, then the others (imagegen.ranks)
            except OSError:
                pass
            self.connection.close()
        self.thread.join()


def main() -> None:
    """A rank of a RankedGenerator: rank 0 takes rows from the feeding process; the others mirror it."""
    count = int(os.environ[distributed.WORLD_ENV])
    if ranks.rank() != 0:
        return ranks.follow()
    host, port, key = os.environ[ROWS_ENV].split(":")
    with Client((host, int(port)), authkey=bytes.fromhex(key)) as feed, ranks.lead(count):
        generator = Generator(feed.recv())
        while True:
            try:
                row = feed.recv()
            except EOFError:  # the feeding process is gone
                return
            if row is None:
                return
            feed.send(generator.generate(row))


if __name__ == "__main__":
    main()
