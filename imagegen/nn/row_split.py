"""The VAE decode split over ranks in bands of rows, equal to the unsplit decode (within float rounding).

Each rank decodes one band of the latent's rows. Everything in the decoder is local to a pixel or its 3x3
neighbourhood except group norm and the mid-block attention, so three exchanges make the bands exact (xDiT's
patch-parallel VAE does the same): every 3x3 convolution pads its band with its neighbours' edge rows (the halo)
instead of zeros, group norm sums its statistics over all ranks, and attention's keys and values are gathered
over all bands. Nearest upsampling keeps the bands aligned. The bands are gathered into the image at the end.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import mlx.core as mx


class RowSplit:
    """A group of ranks each holding one band of an NHWC map's rows (axis 1); bands follow rank order."""

    def __init__(self, group: mx.distributed.Group, rows: int):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        part, extra = divmod(rows, self.size)
        self.bands = [part + (r < extra) for r in range(self.size)]  # latent rows per rank, the first get one more
        self.rows = rows

    def band(self, x: mx.array) -> mx.array:
        """This rank's rows of the full latent x [B, rows, W, C]."""
        start = sum(self.bands[: self.rank])
        return x[:, start : start + self.bands[self.rank]]

    def scale(self, x: mx.array) -> int:
        """How many times the band's rows have been upsampled (x is this rank's band of a map)."""
        return x.shape[1] // self.bands[self.rank]

    def sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def total_rows(self, x: mx.array) -> int:
        """Rows of the whole map whose band x is."""
        return self.rows * self.scale(x)

    def with_halo(self, x: mx.array) -> mx.array:
        """x [B, h, W, C] with one more row on each side: the neighbouring bands' edge rows, zeros at the image's
        top and bottom (the padding of a 3x3 convolution)."""
        edges = mx.distributed.all_gather(mx.concatenate([x[:, :1], x[:, -1:]], axis=1), group=self.group)
        edges = edges.reshape(self.size, x.shape[0], 2, *x.shape[2:])  # [rank, B, (first, last), W, C]
        zero = mx.zeros_like(x[:, :1])
        above = edges[self.rank - 1, :, 1:2] if self.rank > 0 else zero
        below = edges[self.rank + 1, :, 0:1] if self.rank < self.size - 1 else zero
        return mx.concatenate([above, x, below], axis=1)

    def gather(self, x: mx.array) -> mx.array:
        """Every rank's band of a map in row order: [B, total rows, W, C] on every rank."""
        scale = self.scale(x)
        longest = self.bands[0] * scale
        padded = mx.pad(x, [(0, 0), (0, longest - x.shape[1]), (0, 0), (0, 0)])  # all_gather needs equal shapes
        parts = mx.distributed.all_gather(padded, group=self.group).reshape(self.size, *padded.shape)
        return mx.concatenate([parts[r, :, : rows * scale] for r, rows in enumerate(self.bands)], axis=1)

    @contextlib.contextmanager
    def active(self) -> Iterator[RowSplit]:
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


_current: contextvars.ContextVar[RowSplit | None] = contextvars.ContextVar("row_split", default=None)


def current() -> RowSplit | None:
    """The split the VAE blocks exchange halos and statistics over right now (inside `decode`), else None."""
    return _current.get()


# Latent positions (rows x columns) from which splitting pays: the halo exchanges and the gather cost about what a
# small decode takes. Two H200s (benchmarks/results/2026-11-29-h200x2-notes.md): a 1024 px image (128x128 latent)
# decoded 0.94x as fast split, a 2048 px one (256x256) 1.55x; the threshold sits between, at 1536 px.
MIN_POSITIONS = 192 * 192


def can_split(latent_shape: tuple[int, ...], group: mx.distributed.Group | None) -> bool:
    """Whether a [B, rows, columns, C] latent splits over the group: more than one rank, at least one row each,
    and large enough to gain (MIN_POSITIONS)."""
    _, rows, columns, _ = latent_shape
    return group is not None and group.size() > 1 and rows >= group.size() and rows * columns >= MIN_POSITIONS


def decode(decode_band: Callable[[mx.array], mx.array], latents: mx.array, group: mx.distributed.Group) -> mx.array:
    """decode_band (a VAE decode of NHWC latents, untiled) applied over the group: every rank decodes its band of
    rows and receives the whole image. Check `can_split` first."""
    split = RowSplit(group, latents.shape[1])
    with split.active():
        return split.gather(decode_band(split.band(latents)))
