"""The server run inside another program (a test, a notebook): uvicorn in a background thread on a free
loopback port, stopped when the block ends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve_in_thread(*args: Any, **options: Any) -> Iterator[tuple[str, Any]]:
    """Serves create_app(*args, **options); yields (base URL "http://127.0.0.1:PORT", the app) once the app
    (with its lifespan: the device worker, the preloads) has started."""
    from . import create_app

    app = create_app(*args, **options)
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="imagegen-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            listener.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
