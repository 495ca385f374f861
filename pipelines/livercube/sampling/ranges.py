"""Byte ranges of stored objects and the rule that merges them into requests (pure).

Over a network a request costs a round trip, so ranges of one object that lie close together
are better fetched as one; but every byte between them is fetched for nothing.  The rule here
merges a range into the request before it only when the request's wasted bytes stay a small
fraction (``overfetch``) of the bytes actually wanted, the gap is at most ``max_gap`` and the
request stays under ``max_request`` — so a patch never costs many times its own chunks in
transfer, whatever the layout of the shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class ByteRange(NamedTuple):
    """``[start, end)`` of the object ``key``; ``start=end=None`` is the whole object and
    ``start < 0`` with ``end=None`` the last ``-start`` bytes (a shard index at the end)."""

    key: str
    start: int | None = None
    end: int | None = None

    @property
    def nbytes(self) -> int | None:
        if self.start is None or self.end is None or self.start < 0:
            return None
        return self.end - self.start


class Part(NamedTuple):
    """Where input range ``index`` lies inside a merged request's body."""

    index: int
    offset: int
    nbytes: int


class Request(NamedTuple):
    """One request for ``range``, serving the input ranges ``parts`` (whole-object and suffix
    ranges are never merged: their single part has ``nbytes == -1``, i.e. the whole body)."""

    range: ByteRange
    parts: tuple[Part, ...]


def merge_ranges(
    ranges: Sequence[ByteRange],
    *,
    max_gap: int,
    overfetch: float,
    max_request: int,
) -> list[Request]:
    """Group ``ranges`` into requests; every input range is served by exactly one request.

    Within one object, ranges are taken in order of their start and a range joins the current
    request when (a) the gap to it is ≤ ``max_gap``, (b) the request would stay ≤
    ``max_request`` bytes long (a single longer range is still one request), and (c) the
    bytes fetched but not wanted would stay ≤ ``overfetch`` × the bytes wanted.  Adjacent or
    overlapping ranges therefore always merge (up to ``max_request``); with ``overfetch=0``
    nothing else does.
    """
    out: list[Request] = []
    by_key: dict[str, list[tuple[int, int, int]]] = {}
    for i, r in enumerate(ranges):
        if r.nbytes is None:
            out.append(Request(r, (Part(i, 0, -1),)))
        else:
            by_key.setdefault(r.key, []).append((r.start, r.end, i))  # type: ignore[arg-type]
    for key, items in by_key.items():
        items.sort()
        start, end, i0 = items[0]
        parts = [Part(i0, 0, end - start)]
        wanted = end - start  # bytes of the union of the member ranges
        for s, e, i in items[1:]:
            new_end = max(end, e)
            new_wanted = wanted + max(0, new_end - max(end, s))
            waste = (new_end - start) - new_wanted
            if (
                s - end <= max_gap
                and new_end - start <= max_request
                and waste <= overfetch * new_wanted
            ):
                parts.append(Part(i, s - start, e - s))
                end, wanted = new_end, new_wanted
            else:
                out.append(Request(ByteRange(key, start, end), tuple(parts)))
                start, end, wanted, parts = s, e, e - s, [Part(i, 0, e - s)]
        out.append(Request(ByteRange(key, start, end), tuple(parts)))
    return out


__all__ = ["ByteRange", "Part", "Request", "merge_ranges"]
