"""Long-running commands over several ranks (`imagegen serve --gpus N`, `imagegen batch --gpus-per-worker N`):
rank 0 does the command's work and the other ranks mirror its pipelines.

Every rank must make the same pipeline calls, since each call's collectives (imagegen.distributed) pair up across
ranks. Rank 0 runs the command as usual, except that its pipelines are `MirroredPipeline`s: each load and each
generate is first sent to the other ranks over a local control connection (multiprocessing.connection, set up by
imagegen.distributed.launch), which run the same call on the same inputs. Each step is paired too: rank 0 says
after its step callback whether to go on (a server request the client gave up ends on every rank at the same
step) or to decode a preview first. Followers answer each call with its outcome.

A call that fails on one rank alone can leave the others waiting in a collective forever: when rank 0 failed and
another rank's outcome does not come within OUTCOME_WAIT seconds, or another rank answered and rank 0's call is
still running OUTCOME_WAIT seconds later, rank 0 ends its process, so that the launcher stops every rank and the
failure shows, rather than leaving a server that hangs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import mlx.core as mx

from . import registry
from .distributed import CONTROL_ENV, CONTROL_KEY_ENV
from .errors import ImagegenError
from .pipeline import GenerationResult, Pipeline, Request, Step
from .registry import ModelSpec

CONNECT_WAIT = 300.0  # seconds for the ranks to find each other (a rank starts with imports and plugin loading)
OUTCOME_WAIT = 120.0  # seconds the other ranks' outcomes may lag rank 0's own failure
log = logging.getLogger("imagegen.ranks")


class Stopped(Exception):
    """Rank 0 stopped the call at this step (its step callback raised)."""


def rank() -> int:
    """This process's rank among those imagegen.distributed.launch started (0 without a launch)."""
    return int(os.environ.get("MLX_RANK", "0"))


def _address() -> tuple[tuple[str, int], bytes]:
    host, port = os.environ[CONTROL_ENV].rsplit(":", 1)
    return (host, int(port)), bytes.fromhex(os.environ[CONTROL_KEY_ENV])


# ---- rank 0 ----------------------------------------------------------------------------------
class Leader:
    """Rank 0's end of the control connections: sends each call to every other rank and collects outcomes."""

    def __init__(self, followers: list[Connection]):
        self.followers = followers
        self.pipelines: weakref.WeakValueDictionary[int, MirroredPipeline] = weakref.WeakValueDictionary()
        self.sent_live: set[int] = set()
        self.handles = 0

    def send(self, message: tuple[Any, ...]) -> None:
        for follower in self.followers:
            follower.send(message)

    def sync(self) -> None:
        """Tell the others which pipelines rank 0 still holds, so they free the ones it unloaded."""
        live = set(self.pipelines.keys())
        if live != self.sent_live:
            self.send(("live", sorted(live)))
            self.sent_live = live

    def outcomes(self, failed: bool) -> list[str | None]:
        """Every other rank's outcome of the current call (None: it went well, else its error). After a
        failure here, ranks that do not answer within OUTCOME_WAIT are stuck: this process ends (see above)."""
        answers = []
        for r, follower in enumerate(self.followers, 1):
            if failed and not follower.poll(OUTCOME_WAIT):
                log.critical("rank %d does not answer after rank 0 failed: stopping every rank", r)
                os._exit(1)
            answers.append(follower.recv())
        return answers

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """While rank 0 runs a call: an outcome that came OUTCOME_WAIT seconds ago and rank 0 still running means
        another rank failed where rank 0 waits for it in a collective: end this process (see above)."""
        done = threading.Event()

        def watch() -> None:
            answered = None
            while not done.wait(1.0):
                if answered is None and any(f.poll() for f in self.followers):
                    answered = time.monotonic()
                if answered is not None and time.monotonic() - answered > OUTCOME_WAIT:
                    log.critical("another rank ended its call but rank 0 is still waiting: stopping every rank")
                    os._exit(1)

        watcher = threading.Thread(target=watch, name="imagegen-ranks-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def load(self, spec: ModelSpec, **options: Any) -> MirroredPipeline:
        """spec.pipeline(**options) on every rank (callables in options stay here: on_load)."""
        self.sync()
        self.handles += 1
        handle = self.handles
        self.send(("load", handle, spec.id, {k: v for k, v in options.items() if not callable(v)}))
        try:
            pipe = spec.pipeline(**options)
        finally:
            errors = [e for e in self.outcomes(failed=False) if e is not None]
        if errors:
            raise ImagegenError(f"Another rank could not load '{spec.id}': {errors[0]}")
        mirrored = MirroredPipeline(self, handle, pipe)
        self.pipelines[handle] = mirrored
        return mirrored

    def close(self) -> None:
        for follower in self.followers:
            with contextlib.suppress(OSError):
                follower.send(("exit",))
                follower.close()


class MirroredPipeline:
    """A pipeline of rank 0 whose generate runs on every rank; everything else reads the pipeline itself."""

    def __init__(self, leader: Leader, handle: int, pipe: Pipeline):
        self.leader, self.handle, self.inner = leader, handle, pipe
        self._in_step = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(
        self, prompt: str | list[str] | Request, *, on_step: Callable[[Step], None] | None = None, **options: Any
    ) -> GenerationResult:
        self.leader.sync()
        self.leader.send(("generate", self.handle, prompt, options))
        told_stop = False

        def step(s: Step) -> None:
            nonlocal told_stop
            self._in_step = True
            try:
                if on_step is not None:
                    on_step(s)
            except BaseException:
                told_stop = True
                self.leader.send(("stop",))
                raise
            finally:
                self._in_step = False
            self.leader.send(("go",))

        with self.leader.watching():
            try:
                result = self.inner.generate(prompt, on_step=step, **options)
            except BaseException:
                if not told_stop:  # a follower waiting at its next step ends there
                    self.leader.send(("stop",))
                self.leader.outcomes(failed=True)
                raise
            self.leader.outcomes(failed=False)
        return result

    def decode(self, request: Request, latents: mx.array) -> list[Any]:
        """A preview decode within a step callback: every rank decodes its own copy of the step's latents."""
        if not self._in_step:
            raise RuntimeError("Over several ranks, decode runs only within a generate step callback.")
        self.leader.send(("decode", request))
        return self.inner.decode(request, latents)

    def run(self, *args: Any, **options: Any) -> Any:
        raise ImagegenError("Over several GPUs a pipeline runs through generate(), not run().")


_leader: Leader | None = None


def leader() -> Leader | None:
    """Rank 0's Leader while `lead` runs (None elsewhere)."""
    return _leader


def load(spec: ModelSpec, **options: Any) -> Pipeline:
    """spec.pipeline(**options): on every rank under `lead`, else here alone."""
    return _leader.load(spec, **options) if _leader is not None else spec.pipeline(**options)


@contextlib.contextmanager
def lead(count: int) -> Iterator[Leader]:
    """In rank 0: wait for the other count - 1 ranks to connect; pipelines `load`ed inside are mirrored."""
    global _leader
    address, key = _address()
    followers: list[Connection | None] = [None] * (count - 1)
    with Listener(address, authkey=key) as listener:
        accepted = threading.Thread(target=lambda: [_accept(listener, followers) for _ in followers], daemon=True)
        accepted.start()
        accepted.join(CONNECT_WAIT)
        if accepted.is_alive():
            raise ImagegenError(
                f"Only {sum(f is not None for f in followers) + 1} of {count} ranks started within {CONNECT_WAIT:.0f}s."
            )
    _leader = mirror = Leader(followers)  # type: ignore[arg-type]
    try:
        yield mirror
    finally:
        _leader = None
        mirror.close()


def _accept(listener: Listener, followers: list[Connection | None]) -> None:
    connection = listener.accept()
    followers[connection.recv() - 1] = connection  # a follower says its rank first


# ---- the other ranks -------------------------------------------------------------------------
def follow() -> None:
    """In a rank other than 0: run rank 0's calls until it closes the connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: this one ends when rank 0 has drained
    address, key = _address()
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        try:
            connection = Client(address, authkey=key)
            break
        except ConnectionRefusedError:  # rank 0 is not listening yet
            if time.monotonic() > deadline:
                raise ImagegenError("Rank 0 did not start its control connection.") from None
            time.sleep(0.2)
    connection.send(rank())
    pipelines: dict[int, Pipeline] = {}
    with connection:
        while True:
            try:
                message = connection.recv()
            except EOFError:  # rank 0 ended
                return
            kind = message[0]
            if kind == "exit":
                return
            if kind == "live":
                for handle in set(pipelines) - set(message[1]):
                    del pipelines[handle]
                gc.collect()
                mx.clear_cache()
            elif kind == "load":
                _, handle, model, options = message
                connection.send(_outcome(_load_into, pipelines, handle, model, options))
            elif kind == "generate":
                _, handle, prompt, options = message
                pipe = pipelines[handle]
                connection.send(_outcome(pipe.generate, prompt, on_step=_paired(connection, pipe), **options))
            # "go" / "stop" outside a call: rank 0 stopped a call this rank had already ended (the same error)


def _load_into(pipelines: dict[int, Pipeline], handle: int, model: str, options: dict[str, Any]) -> None:
    pipelines[handle] = registry.get(model).pipeline(**options)


def _paired(connection: Connection, pipe: Pipeline) -> Callable[[Step], None]:
    """The step callback of a follower: wait for rank 0's word on this step (decoding previews it asks for)."""

    def on_step(step: Step) -> None:
        while True:
            message = connection.recv()
            if message[0] == "go":
                return
            if message[0] == "stop":
                raise Stopped()
            if message[0] == "decode":
                pipe.decode(message[1], step.latents)

    return on_step


def _outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    """None when the call went well, else its error in one line (Stopped counts as well: rank 0 asked for it)."""
    try:
        call(*args, **kwargs)
    except Stopped:
        return None
    except Exception as e:
        log.warning("rank %d: %s: %s", rank(), type(e).__name__, e)
        return f"{type(e).__name__}: {e}"
    return None
