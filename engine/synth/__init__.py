"""Procedural micrographs with ground truth.

Twelve materials (`MATERIALS`), three modalities with their imaging physics
(`MODALITIES`), and five defect classes (`DEFECT_CLASSES`) with instance masks and
boxes; everything reproducible from a seed. Entry points:
`engine.synth.archive.generate_archive` (a whole archive),
`engine.synth.plan.plan_archive` (plans, no pixels) and
`engine.synth.image.render_image` / `write_image` (one image).
"""

from engine.stores.catalog import MODALITIES
from engine.synth.defects import DEFECT_CLASSES
from engine.synth.materials import MATERIALS

__all__ = ["DEFECT_CLASSES", "MATERIALS", "MODALITIES"]
