"""What every source planner returns: a :class:`Plan` of :class:`VolumeTask` s.

A collection plugs in by providing a planner (``registry.Collection.planner``) that reads
headers and file names only and returns a :class:`Plan`.  ``convert`` and ``verify`` see
nothing but this interface: they never branch on the collection, and the store — not the
source — decides where a volume lives (:func:`livercube.store.layout.task_path`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from livercube.schema import STORE_SCHEMA_VERSION


@runtime_checkable
class VolumeTask(Protocol):
    """One output volume: small, picklable (it travels to Dask workers), pure until ``read``."""

    #: Collection id (``hcc_tace_seg``, ``crlm``, ``plc_cect``).
    collection: str

    @property
    def key(self) -> str:
        """How the input is named in the report (relative to the source)."""
        ...

    @property
    def patient_id(self) -> str: ...

    @property
    def study(self) -> str:
        """Study name inside the patient (store path component, unsanitized)."""
        ...

    @property
    def series(self) -> str:
        """Series (volume) name inside the study (store path component, unsanitized)."""
        ...

    @property
    def fingerprint(self) -> str:
        """Changes whenever the volume written from this task would change (the resume key)."""
        ...

    def read(self, storage_options: dict | None = None) -> tuple[Any, list[dict[str, str]]]:
        """Decode the sources: the :class:`~livercube.volumes.volume.Volume` and the inputs
        left out of it (each ``{"input": …, "reason": …}``)."""
        ...


@dataclass
class Plan:
    """A planned conversion: tasks, inputs left out (with reasons), warnings, clinical columns."""

    tasks: list[Any]  # VolumeTask; Any so dataclass repr/pickle do not care about the protocol
    skipped: list[dict[str, str]]
    warnings: list[str]
    clinical_columns: dict[str, dict[str, Any]]
    #: How DICOM free-text descriptors were stored this run (for the conversion report).
    deidentification: dict[str, Any] = field(default_factory=dict)


def task_fingerprint(*parts: Any) -> str:
    """``sha256:`` of the store schema version and ``parts`` (their ``repr``).

    The schema version is always part of it, so a layout change re-converts every volume.
    ``parts`` must have a deterministic ``repr`` (dataclasses, tuples, sorted items).
    """
    body = repr((STORE_SCHEMA_VERSION, *parts))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()
