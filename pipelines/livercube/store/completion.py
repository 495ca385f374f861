"""The completion record: what a volume's writer writes last, and what says the volume is whole.

A volume group is visible as a volume only once its ``livercube`` attributes carry
``status: "complete"`` and a ``complete`` record (content checksum, source fingerprint, time).
Writers stamp it, and every reader — catalog, resume, verify, publish, sampler — asks
:meth:`CompletionRecord.of` instead of reading the raw dictionary.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

#: ``status`` of a volume whose every object was written before its group document.
STATUS_COMPLETE = "complete"


@dataclass(frozen=True)
class CompletionRecord:
    """Content checksum, source fingerprint and write time of a complete volume."""

    checksum: str
    fingerprint: str = ""
    written_at: str = ""

    @classmethod
    def new(cls, checksum: str, fingerprint: str = "") -> CompletionRecord:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return cls(checksum=checksum, fingerprint=fingerprint, written_at=now)

    def stamp(self, meta: MutableMapping[str, Any]) -> None:
        """Mark ``meta`` (a volume's ``livercube`` attributes) as complete with this record."""
        meta["status"] = STATUS_COMPLETE
        meta["complete"] = asdict(self)

    @classmethod
    def of(cls, meta: Any) -> CompletionRecord | None:
        """The record of a volume's attributes, or ``None`` when it is not complete."""
        if not isinstance(meta, Mapping) or meta.get("status") != STATUS_COMPLETE:
            return None
        rec = meta.get("complete")
        if not isinstance(rec, Mapping):
            return None
        return cls(
            checksum=str(rec.get("checksum", "")),
            fingerprint=str(rec.get("fingerprint", "") or ""),
            written_at=str(rec.get("written_at", "") or ""),
        )


def is_complete(meta: Any) -> bool:
    """Whether a volume's ``livercube`` attributes say it is whole."""
    return CompletionRecord.of(meta) is not None
