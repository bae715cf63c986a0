"""Ray Data sources and sinks for grainflow archives.

Modules (import the one you need; this package imports nothing on its own):

- `sample_plan`: training samples planned from an archive's catalog and ground truth
  as light `SampleSpec`s (no pixels on the driver);
- `training_samples`: the Ray Data read stage that turns specs into pixel tiles,
  labels and class indices inside Ray tasks (`training_dataset`).
"""
