"""The invariant every converted SEG must keep: what the SEG's frames hold is what the store holds.

For each segment, the voxels in the store's ``segments`` field equal the voxels the placement
recorded, and those equal the foreground pixels of the SEG's own frames minus the ones that fell
outside the CT (which the report names) — unless the SEG had to be resampled or frames painted
the same voxels (both recorded in the segmentation notes).
"""

from __future__ import annotations

import numpy as np


def assert_segment_counts(store, index: int) -> None:
    """Check the invariant for volume ``index`` of an opened livercube store."""
    meta = store.volume_attrs(index)
    seg = meta["source"]["segmentation"]
    assert seg is not None, "volume is not annotated"
    counts = seg["voxel_counts"]
    masks = store.segments(index)
    assert set(masks) == set(counts), (sorted(masks), sorted(counts))
    exempt = seg["resampled"] or any("more than one frame" in n for n in seg["notes"])
    for label, c in counts.items():
        stored = int(np.count_nonzero(masks[label]))
        assert stored == c["stored_voxels"], (label, stored, c)
        if not exempt:
            assert stored == c["source_voxels"] - c["outside_voxels"], (label, stored, c)
