"""One synthetic image: render it in memory (small images) or write it as OME-Zarr
chunk by chunk (any size), with its defect labels and ground truth."""

from __future__ import annotations

from typing import Callable

import numpy as np

from engine.stores.uri import StoreLocation
from engine.stores.writer import ImageInfo, ImageWriter
from engine.synth.defects import CLASS_COLOURS
from engine.synth.plan import ImagePlan
from engine.synth.render import ImageRenderer
from engine.synth.truth import TruthRow

LABELS = "defects"


def render_region(plan: ImagePlan, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and uint32 instance labels of level-0 [y0:y0+h, x0:x0+w] of a planned image.

    Identical to the same region of the written image, whatever the chunking.
    """
    return ImageRenderer(plan).region(y0, x0, h, w)


def render_image(plan: ImagePlan) -> tuple[np.ndarray, np.ndarray]:
    """The whole image in memory: (H, W) pixels of `plan.dtype` (uint16 SEM/TEM, uint8
    optical) and (H, W) uint32 labels (instance id, 0 = background). Small images only;
    `write_image` streams any size."""
    h, w = plan.shape
    return render_region(plan, 0, 0, h, w)


def write_image(plan: ImagePlan, location: str | StoreLocation,
                progress: Callable[[int], None] | None = None) -> tuple[ImageInfo, list[TruthRow]]:
    """Write the image, its `defects` label image and pyramid as OME-Zarr v0.5.

    Chunks are rendered and written one at a time in row-major order, so memory is about
    one chunk (plus halo) whatever the image size. `progress(1)` is called after each
    chunk. Returns the writer's ImageInfo and one TruthRow per defect.
    """
    h, w = plan.shape
    c = plan.chunk
    colours = {d.instance_id: CLASS_COLOURS[d.defect_class] for d in plan.defects}
    properties = [{"label-value": d.instance_id, "class": d.defect_class} for d in plan.defects]
    renderer = ImageRenderer(plan)
    # `with`: an error mid-way removes the partly written image (the writer's staging copy)
    with ImageWriter(location, shape=plan.shape, dtype=plan.dtype, pixel_size=plan.pixel_size_nm,
                     unit="nanometer", chunk=c, name=plan.image_id, attributes=plan.attributes) as writer:
        labels = writer.add_labels(LABELS, dtype="uint32", colors=colours or None, properties=properties or None)
        for y in range(0, h, c):
            for x in range(0, w, c):
                pixels, mask = renderer.region(y, x, min(c, h - y), min(c, w - x))
                writer.write_tile(y, x, pixels)
                labels.write_tile(y, x, mask)
                if progress is not None:
                    progress(1)
            renderer.forget_above(y + c)
    info = writer.info
    truth = [TruthRow.of(plan.image_id, iid, plan.defects[iid - 1].defect_class, box, area, plan.pixel_size_nm)
             for iid, (box, area) in sorted(renderer.all_truth().items())]
    return info, truth
