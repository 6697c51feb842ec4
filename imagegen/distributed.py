"""One image over several GPUs (or local CPU processes): sequence parallelism over a transformer's image tokens.

Every rank runs the same request with the same inputs. The transformer splits its image tokens into equal
contiguous shards, one per rank; text tokens (and everything small) stay replicated. Everything in a block is
token-local except attention, where each rank's queries attend over the keys/values of all tokens: the image
part of k and v is all-gathered (the approach of diffusers' context parallel "all-gather" mode and xDiT's
"ring-free" variant; one all_gather of k and v per attention). The output tokens are gathered at the end, so each
rank holds the full velocity and the scheduler runs unchanged.

Processes are launched by `launch` (what `imagegen run --gpus N`, `serve --gpus N` and `batch --gpus-per-worker N`
use): on CUDA one process per GPU over MLX's NCCL backend (NVLink multicast kept off: NCCL_NVLS_ENABLE=0 in every
rank), elsewhere local processes over MLX's ring backend (the CPU test path). The VAE decode splits over the same
group (imagegen.nn.row_split); long-running commands keep their ranks in step with imagegen.ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx

from .errors import InvalidOptionError

CONTROL_ENV = "IMAGEGEN_CONTROL"  # host:port rank 0 listens on for the others (imagegen.ranks); set by launch
CONTROL_KEY_ENV = "IMAGEGEN_CONTROL_KEY"  # the connection's shared secret (hex)
WORLD_ENV = "IMAGEGEN_WORLD_SIZE"  # set in every rank launch() starts; its absence means one process
FOLLOWERS_GRACE = 30.0  # seconds the other ranks may take to end after rank 0 ended well


class SequenceParallel:
    """A group of ranks splitting the token axis (1) of [B, L, ...] activations into equal contiguous shards."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.replicated = 0  # leading tokens every rank holds whole (text): set per call by `active`

    def _padded(self, length: int) -> int:
        return -(-length // self.size) * self.size

    def shard(self, x: mx.array) -> mx.array:
        """This rank's part of x's tokens; the last shards are zero-padded so all are equal (see `gather`)."""
        length = x.shape[1]
        padded = self._padded(length)
        if padded != length:
            x = mx.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        part = padded // self.size
        return x[:, self.rank * part : (self.rank + 1) * part]

    def gather(self, x: mx.array, length: int) -> mx.array:
        """The inverse of `shard`: every rank's part in rank order along tokens, cut back to `length` tokens."""
        parts = mx.distributed.all_gather(x, group=self.group)  # [size * B, L_part, ...]: ranks along axis 0
        b = x.shape[0]
        full = parts.reshape(self.size, b, *x.shape[1:]).swapaxes(0, 1)
        return full.reshape(b, self.size * x.shape[1], *x.shape[2:])[:, :length]

    def keys_values(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """k, v [B, L, H, D] over [replicated tokens, this rank's shard] -> over [replicated, every shard].
        Padding tokens of the last shard are kept out of the gathered keys (the true length is remembered)."""
        n = self.replicated
        return tuple(mx.concatenate([t[:, :n], self.gather(t[:, n:], self.length)], axis=1) for t in (k, v))

    @contextlib.contextmanager
    def active(self, replicated: int, length: int) -> Iterator[SequenceParallel]:
        """Within the block, attention gathers keys/values over this group: `replicated` leading tokens are whole
        on every rank, the `length` tokens after them are sharded."""
        self.replicated, self.length = replicated, length
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


_current: contextvars.ContextVar[SequenceParallel | None] = contextvars.ContextVar("sequence_parallel", default=None)


def current() -> SequenceParallel | None:
    """The group attention gathers keys/values over right now (inside a sharded transformer call), else None."""
    return _current.get()


def from_environment() -> SequenceParallel | None:
    """The group of a process that `launch` started (None for a plain single process)."""
    if int(os.environ.get(WORLD_ENV, "1")) <= 1:
        return None
    return SequenceParallel(_world())


@functools.cache
def _world() -> mx.distributed.Group:
    """The ranks' group, made once per process: a server loads many pipelines over the same connections."""
    return mx.distributed.init(backend="nccl" if _on_cuda() else "ring", strict=True)


def check_count(count: int, flag: str = "--gpus") -> None:
    """Refuse a rank count below 1, or above the GPUs visible on CUDA (elsewhere ranks are local CPU processes)."""
    if count < 1:
        raise InvalidOptionError(f"{flag} must be >= 1, got {count}.")
    if count > 1 and _on_cuda() and count > len(_visible_gpus()):
        raise InvalidOptionError(f"{flag} {count}: only {len(_visible_gpus())} GPU(s) are visible.")


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(mx.device_count(mx.gpu))]


def _on_cuda() -> bool:
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rank_environments(count: int, folder: Path, extra: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The environment of each rank: MLX's NCCL variables and one GPU each on CUDA, a ring hostfile elsewhere; and
    the control connection of imagegen.ranks (rank 0 listens, the others connect)."""
    (control,) = _free_ports(1)
    base = {
        **os.environ,
        **(extra or {}),
        WORLD_ENV: str(count),
        "MLX_WORLD_SIZE": str(count),
        CONTROL_ENV: f"127.0.0.1:{control}",
        CONTROL_KEY_ENV: secrets.token_hex(16),
    }
    if _on_cuda():
        check_count(count)
        gpus = _visible_gpus()
        (port,) = _free_ports(1)
        # NVLink multicast off: on shared hosts a process that uses it can take the GPUs out of service
        shared = {**base, "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": str(port), "NCCL_NVLS_ENABLE": "0"}
        return [{**shared, "MLX_RANK": str(r), "CUDA_VISIBLE_DEVICES": gpus[r]} for r in range(count)]
    hostfile = folder / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(count)]))
    return [{**base, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(count)]


@contextlib.contextmanager
def _forwarding_signals(leader: subprocess.Popen) -> Iterator[set[int]]:
    """While the ranks run, SIGTERM sent to this process goes to rank 0 instead of ending this one, and SIGINT is
    left to the ranks (Ctrl-C reaches every process of the terminal's group by itself); yields the signals that
    rank 0 got, which it may end by (uvicorn re-raises them after its graceful shutdown)."""
    expected: set[int] = set()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield expected
        return

    def forward(number: int, frame: object) -> None:
        expected.add(number)
        leader.send_signal(number)

    def interrupted(number: int, frame: object) -> None:
        expected.add(number)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGINT: signal.signal(signal.SIGINT, interrupted),
    }
    try:
        yield expected
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def launch(argv: Sequence[str], count: int, extra_env: dict[str, str] | None = None) -> int:
    """Run `argv` (a Python command line, e.g. this CLI's) as `count` ranks, with `extra_env` added to this
    process's environment, and wait for all of them. Rank 0's output passes through; the others' only when they
    fail. SIGTERM goes to rank 0 (a server drains, then ends the others through imagegen.ranks); Ctrl-C reaches
    every rank from the terminal. Returns the exit code of the first rank that failed (the others are stopped
    then), else 0."""
    check_count(count)
    with tempfile.TemporaryDirectory(prefix="imagegen-ranks-") as folder:
        envs = rank_environments(count, Path(folder), extra_env)
        logs = [None] + [open(Path(folder) / f"rank{r}.log", "w+") for r in range(1, count)]
        ranks = [subprocess.Popen(list(argv), env=env, stdout=log, stderr=log) for env, log in zip(envs, logs)]
        with _forwarding_signals(ranks[0]) as expected:

            def first_failure() -> int:
                return next((p.returncode for p in ranks if _failed(p, expected if p is ranks[0] else set())), 0)

            failure, leader_ended = 0, None
            while None in [p.poll() for p in ranks]:  # a list: every rank polled each round
                failure = failure or first_failure()
                if ranks[0].returncode is not None and leader_ended is None:
                    leader_ended = time.monotonic()
                late = leader_ended is not None and time.monotonic() - leader_ended > FOLLOWERS_GRACE
                if failure or late:  # one failed, or rank 0 is gone: the others would wait for it forever
                    for p in ranks:
                        if p.poll() is None:
                            p.terminate()
                time.sleep(0.05)
        codes = [p.wait() for p in ranks]
        for code, log in zip(codes[1:], logs[1:]):
            log.seek(0)
            if code:
                sys.stderr.write(log.read())
            log.close()
    return failure or first_failure()


def _failed(rank: subprocess.Popen, expected: set[int]) -> bool:
    """A rank that ended badly: a non-zero exit other than by one of the `expected` signals (those forwarded to
    rank 0, which uvicorn re-raises after its graceful shutdown)."""
    code = rank.returncode
    return bool(code) and -code not in expected
