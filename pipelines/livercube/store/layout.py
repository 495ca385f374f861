"""Where things live in a store: group paths and safe names (opening one: ``location.py``).

Layout (see ``schemas/store-contract.md``)::

    <root>/zarr.json                         root group, consolidated metadata
    <root>/catalog/                          xarray Dataset, dim ``volume``
    <root>/<collection>/<patient>/<study>/<series>/   one OME-Zarr image per volume
        0/                    full-resolution Dataset: image, label, segments, z, y, x …
        1/, 2/ …              browse levels of the image (own z, y, x)
        (the label pyramid is ``<k>/label``, beside each browse image)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from livercube.schema import CATALOG_GROUP

if TYPE_CHECKING:
    from livercube.sources.plan import VolumeTask

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Group of a volume holding its full-resolution data (OME-Zarr level 0): ``image``, ``label``,
#: ``segments``, ``class_locations`` and the ``z``/``y``/``x`` coordinates.  The volume group
#: itself holds no arrays, so its browse levels (sibling groups) may have other sizes.
FULL_RES = "0"


def data_path(path: str) -> str:
    """Group of the full-resolution arrays of the volume at ``path``.

    ``xarray.open_zarr(url, group=data_path(path))`` is the volume as one Dataset.
    """
    return f"{path.strip('/')}/{FULL_RES}"


def sanitize(name: str | int | None, *, fallback: str = "NA") -> str:
    """A path component safe on every object store and file system.

    DICOM text such as ``"Recon 2: LIVER 3 PHASE (AP)"`` may hold slashes, colons or ``..``;
    anything outside ``[A-Za-z0-9._-]`` becomes ``_``, runs of dots collapse to one and edge
    dots/underscores are stripped, so no key can escape its parent group or hide.
    """
    text = "" if name is None else str(name).strip()
    text = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", text)).strip("._")
    if not text:
        return fallback
    return text[:120]


def volume_path(collection: str, patient: str, study: str, series: str) -> str:
    """Group path of one volume: ``<collection>/<patient>/<study>/<series>``, sanitized."""
    return "/".join(sanitize(p) for p in (collection, patient, study, series))


def in_collection_tree(key: str) -> bool:
    """Whether a store key lies below a collection group (where volumes live).

    Everything at the top level but the catalog and dot-named debris (a catalog swap left
    behind) is a collection — known to this installation or not: a store written with a
    collection plug-in stays readable and checkable without it.
    """
    head = key.strip("/").split("/", 1)[0]
    return bool(head) and head != CATALOG_GROUP and not head.startswith(".") and "/" in key


def task_path(task: VolumeTask) -> str:
    """Where the volume of a planned task goes: sources name volumes, the store places them."""
    return volume_path(task.collection, task.patient_id, task.study, task.series)
