"""Ray Data sources and sinks for grainflow archives.

Modules (import the one you need; this package imports nothing on its own):

- `datasource`: `ZarrTileDatasource`, every tile of an archive's images as a Ray dataset;
- `tile_plan`: tile reads planned from metadata (level, tiles, read tasks), never pixels;
- `tile_read`: the worker side of a read task: open the image, read, yield row blocks;
- `sinks`: the reprocessing job's output layout, its writers, and `read_output`;
- `objects`: an image's defect objects stitched from its tiles' detections;
- `ledger`: the finished tiles a rerun of the reprocessing job may skip;
- `sample_plan`: training samples planned from catalog and ground truth as `SampleSpec`s;
- `training_samples`: specs to pixel tiles, labels and classes in Ray tasks (`training_dataset`).
"""
