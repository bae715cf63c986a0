"""Physics-informed augmentation of single-channel micrographs for training.

Works on numpy (Ray Data's map_batches hands over numpy batches): a `Sample` holds an
(H, W) float32 image in [0, 1], optional labels (mask, XYXY boxes, classes) and the
physics context (modality, pixel size in nm). Every transform is a frozen dataclass
called as `t(sample, rng)` with a numpy Generator, so a seed fixes the result.

    pipe = build_pipeline("SEM", material="am_alloy", strength=0.5)
    out = pipe.run(Sample(image, "SEM", pixel_size_nm=5.0, mask=mask, boxes=boxes), seed=7)

Transforms (registry.TRANSFORMS): dihedral, scale, intensity, scan_drift, scan_jitter,
defocus, diffraction, illumination, shot_noise. For Ray Data: batch.AugmentBatch.
"""

from engine.augment.base import Transform
from engine.augment.batch import AugmentBatch
from engine.augment.geometry import Dihedral, ScaleJitter
from engine.augment.intensity import IntensityMap
from engine.augment.noise import ShotNoise
from engine.augment.optics import DefocusBlur, DiffractionBlur, UnevenIllumination
from engine.augment.pipeline import Compose, build_pipeline
from engine.augment.registry import TRANSFORMS, create_transform
from engine.augment.sample import Sample, SampleError, boxes_from_mask, to_unit_float
from engine.augment.scan import ScanDrift, ScanLineJitter
from engine.augment.symmetry import MATERIAL_SYMMETRY, material_symmetry

__all__ = [
    "AugmentBatch", "Compose", "DefocusBlur", "Dihedral", "DiffractionBlur", "IntensityMap",
    "MATERIAL_SYMMETRY", "Sample", "SampleError", "ScaleJitter", "ScanDrift", "ScanLineJitter",
    "ShotNoise", "TRANSFORMS", "Transform", "UnevenIllumination", "boxes_from_mask",
    "build_pipeline", "create_transform", "material_symmetry", "to_unit_float",
]
