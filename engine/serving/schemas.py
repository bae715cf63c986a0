"""The HTTP API's response bodies (pydantic), which document it in the OpenAPI schema.

Units are in the field names: `_px` level-0 pixels of the uploaded image (xyxy edge
coordinates for boxes, (y, x) for points), `_nm` nanometres, `_ms` milliseconds.
Measurement conventions (`Measured`'s field descriptions) are those of
`engine.pipeline.measure`, the batch job's.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

MODALITIES = ("SEM", "TEM", "optical")
# HTTP status -> ErrorBody.error, every code the app answers; another status (none is
# expected) answers "error"
ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 411: "length_required", 413: "too_large", 415: "unsupported_media",
               422: "invalid", 429: "rate_limited", 500: "internal", 503: "unavailable"}


class ChosenVersion(BaseModel):
    """The traffic arm a request was given: its alias and the bundle version it points at."""

    alias: str = Field(description="the alias whose arm answered (production, canary)")
    bundle: Optional[str] = Field(description="the bundle version, name/version")


class ErrorBody(BaseModel):
    """Every error: its HTTP status, a machine-readable code and a message naming the field at fault."""

    status: int
    error: str = Field(description="machine-readable code, by status: "
                                   + ", ".join(f"{code} ({status})" for status, code in ERROR_CODES.items())
                                   + "; any other status: error")
    detail: str
    request_id: Optional[str] = None
    model: Optional[ChosenVersion] = Field(
        None, description="the version that answered, for an error after the request's arm was chosen (too large "
                          "once resampled, pixels its preprocessing cannot tile, a stage's failure); null for one "
                          "refused before (key, rate, size as sent, media type, fields)")


class Mask(BaseModel):
    """Run-length encoded mask (engine.serving.response.rle_encode): row-major runs of
    (h, w) = size starting with a run of 0s, placed at origin_px with scale level-0 px per mask px."""

    origin_px: Optional[list[float]]
    scale: Optional[list[float]]
    size: list[int]
    counts: list[int]


# What the centroids are, for the two models that report one.
CENTROID_PX = ("(y, x) mean of the mask's pixel centres, level-0 pixels of the uploaded image in edge "
               "coordinates, as box_px: pixel (i, j) covers [i, i + 1) x [j, j + 1), so its centre is "
               "(i + 0.5, j + 0.5); null where the mask is empty")


class Measured(BaseModel):
    """A defect's shape measurements (engine.pipeline.measure, the batch job's), in
    physical units from the (y, x) pixel size, so right for non-square pixels too; null
    where its mask is empty."""

    area_nm2: Optional[float] = Field(description="mask area, nm²: its pixel count x py x px, a pixel being a "
                                                  "py x px nm rectangle ((y, x) pixel size)")
    area_um2: Optional[float] = Field(description="area_nm2 in µm² (1 µm² = 10⁶ nm²)")
    equivalent_diameter_nm: Optional[float] = Field(description="diameter of the disc of the same area, nm")
    major_axis_nm: Optional[float] = Field(
        description="long axis of the ellipse with the mask's second moments, nm: 4 * sqrt(larger eigenvalue) of "
                    "the covariance (nm²) of its pixel centres plus p² / 12 per axis (p: the pixel size on that "
                    "axis, each pixel's own square), so a mask is measured as the union of its pixel squares: a "
                    "one-pixel-wide line is one pixel wide, a disc of radius r measures 2r")
    minor_axis_nm: Optional[float] = Field(description="short axis of that ellipse, nm: 4 * sqrt(smaller eigenvalue)")
    aspect_ratio: Optional[float] = Field(description="major_axis_nm / minor_axis_nm, >= 1")
    orientation_deg: Optional[float] = Field(
        description="angle of the major axis from the image's +x axis (columns, rightwards), counter-clockwise as "
                    "the image is displayed with row 0 at the top (y points down: 45 is up and to the right), in "
                    "degrees in [0, 180) (an axis has no direction), of the shape in nm, so non-square pixels do "
                    "not skew it; null (the batch job's NaN) for a round defect: the moment ellipse round within "
                    "digitisation noise, (major - minor eigenvalue) / major below ROUND_WITHIN / sqrt(n) for a mask "
                    "of n pixels (engine.pipeline.measure; ROUND_WITHIN = 2)")


class Detection(Measured):
    tile: list[int] = Field(description="level-0 (y, x) of the core of the tile that reported it")
    class_id: int
    class_: str = Field(alias="class")
    score: float
    box_px: list[float]
    box_nm: list[float]
    mask_score: Optional[float]
    mask_from_box: bool
    centroid_px: list[Optional[float]] = Field(description=CENTROID_PX)
    mask: Mask


class Label(BaseModel):
    name: Optional[str]
    probs: dict[str, float]


class ModelInfo(ChosenVersion):
    versions: dict[str, str] = Field(description="role -> name/version of every member that answered")


class ImageInfo(BaseModel):
    height: int
    width: int
    dtype: str
    format: str
    sha256: str
    modality: str
    pixel_size_nm: float = Field(description="nm per pixel along x (columns) of the uploaded image")
    pixel_size_y_nm: float = Field(description="nm per pixel along y (rows); equal to pixel_size_nm for square "
                                               "pixels")
    pixel_size_source: str = Field(description="where the pixel size came from: request (the form's pixel_size_nm "
                                               "and pixel_size_y_nm) or tiff metadata (the TIFF's (y, x) pair)")
    level: int = Field(description="the pyramid level the models' tiles were read from (0: as uploaded)")
    level_pixel_size_nm: float = Field(description="nm per pixel along x of the tiles the models saw (the models' "
                                                   "pixel size where the image was resampled to it)")
    level_pixel_size_y_nm: float = Field(description="nm per pixel along y of those tiles")


class Summary(BaseModel):
    n_defects: int = Field(description="objects: detections stitched across tile borders, as the batch job counts "
                                       "them (its summary's n_defects)")
    n_detections: int = Field(description="detections as the tiles reported them (pieces of a defect cut by a tile "
                                          "border count once each)")
    area_mm2: float
    defect_density_per_mm2: Optional[float]
    tiles: int
    tiles_failed: int


class DefectObject(Measured):
    """A defect as the batch job reports it. Its measurements are the whole object's: one
    of several pieces, or one its owner tile saw only in part, is measured on the union
    of its pieces' masks; else they are its detection's."""

    class_id: int
    class_: str = Field(alias="class")
    score: float
    box_px: list[float] = Field(description="xyxy, level-0 pixels of the uploaded image: the union of its "
                                             "pieces, and of the parts other tiles painted of it")
    box_nm: list[float]
    parts: int = Field(description="detections merged into it (more than one: cut by tile borders)")
    detections: list[int] = Field(description="indices into `detections` of its pieces")
    centroid_px: list[Optional[float]] = Field(description=f"of the whole object: {CENTROID_PX}")
    mask: Mask = Field(description="all of its pixels: its pieces' and those other tiles painted of it")


class TileError(BaseModel):
    tile: list[int]
    error: Optional[str]


class AnalyzeResponse(BaseModel):
    request_id: str
    image: ImageInfo
    model: ModelInfo
    material: Label
    grade: Label
    summary: Summary
    detections: list[Detection]
    objects: list[DefectObject] = Field(description="the image's defects: detections stitched across tile borders "
                                                    "(engine.tiling.stitch), best score first")
    tile_errors: list[TileError]
    timings_ms: dict[str, float] = Field(
        description="milliseconds: decode_ms and stages_ms (wall time in the ingress), preprocess_ms, detect_ms, "
                    "segment_ms, classify_ms, measure_ms (compute in each stage's replica; the classifier runs "
                    "beside the detector and segmenter, so stages_ms minus preprocess_ms + max(classify_ms, "
                    "detect_ms + segment_ms) + measure_ms is what the hops between replicas cost), total_ms")
    batch_sizes: dict[str, int] = Field(
        description="detect, segment, classify: how many requests shared that stage's batch, this one included "
                    "(a request waits for company only while the stage's replica has other requests in flight)")
    preview_png: Optional[str] = Field(
        None, description="with preview=true: base64 8-bit grey PNG of the image, contrast stretched, at most "
                          "2048 px on its longest side (draw it scaled to image.width x image.height)")


class ModelsResponse(BaseModel):
    bundle: str
    split: dict[str, float]
    arms: dict[str, str] = Field(description="alias -> bundle version it points at")
    members: dict[str, dict[str, str]] = Field(description="bundle version -> role -> member version")
    class_names: list[str]
    materials: list[str]
    grades: list[str]


class Health(BaseModel):
    status: str
    arms: dict[str, str]
    settings_error: Optional[str] = Field(
        None, description="why this replica refused the last live settings sent (user_config: split, alias_ttl_s, "
                          "generation), which it did not take: it goes on with the settings in force; null when "
                          "it took them")
