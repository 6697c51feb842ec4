"""PNG files behind response_format="url": kept in memory for a while under unguessable ids."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class ImageStore:
    """Expire after `ttl` seconds; past `max_bytes` the oldest images go first."""

    def __init__(self, ttl: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_bytes, self.clock = ttl, max_bytes, clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # id -> (expiry, png)
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        image_id = secrets.token_urlsafe(18)  # 144 random bits: the id itself is the capability
        with self._lock:
            self._prune()
            self._items[image_id] = (self.clock() + self.ttl, png)
            self._bytes += len(png)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._pop_oldest()
        return image_id

    def get(self, image_id: str) -> bytes | None:
        with self._lock:
            self._prune()
            item = self._items.get(image_id)
            return item[1] if item else None

    def __len__(self) -> int:
        return len(self._items)

    def _prune(self) -> None:
        now = self.clock()
        while self._items and next(iter(self._items.values()))[0] <= now:  # insertion order = expiry order
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, (_, png) = self._items.popitem(last=False)
        self._bytes -= len(png)
