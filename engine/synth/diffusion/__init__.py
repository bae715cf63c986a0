"""Diffusion synthesis of rare defects: labelled (image, mask) samples as Ray tasks.

Modules: `conditions` (what may be asked for), `plan` (samples, seeds, batches),
`sampler` (DDIM / DPM-Solver sampling, deterministic per seed), `patches` (the two-
channel representation), `intensity` (the real crops' grey levels, recorded at training
and given back to samples), `calibration` (the conditions training saw and their crops'
pixel sizes, recorded at training), `output` (the synthetic archive: OME-Zarr, catalog
with provenance, rejects, the gate's record), `model_source` (checkpoint or registry
ref), `job` (the Ray driver, `synthesize`), `gate` (classifier agreement and KID before
samples join training), `kid` (kernel inception distance), `crop_classifier` (the gate's
classifier and feature extractor), `cli` (`grainflow synthesize`). The model itself is
engine.models.diffusion; it trains on Ray Train as the `diffusion` family
(engine.training).
"""
