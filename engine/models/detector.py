"""Defect detector: an Ultralytics YOLO (v8 or 11) built from its own model YAML.

Ultralytics is imported inside functions: its package configures logging, thread
counts and settings files when imported, which must not happen on `import engine`.
Entry points that build detectors call `engine.runtime.configure_offline()` first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from engine.models.errors import CheckpointError, ModelConfigError
from engine.models.tiles import model_device, tiles_to_tensor

# Model YAMLs shipped inside the ultralytics package (cfg/models/...), per architecture.
_ARCH_YAML = {"yolov8": "v8/yolov8.yaml", "yolo11": "11/yolo11.yaml"}

# Ultralytics letterboxes with grey 114/255; padding with the same value keeps a tile's
# border looking like what the model saw in Ultralytics training.
_PAD_VALUE = 114 / 255


class Detections(NamedTuple):
    """Detections in one tile, sorted by score (highest first).

    boxes: N x 4 float32, xyxy in pixels of the tile as given (x right, y down);
    scores: N float32 in [0, 1]; classes: N int64 indices into `Detector.names`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


class Detector(nn.Module):
    """A YOLO detection model with batched prediction on micrograph tiles.

    `model` is the Ultralytics DetectionModel itself, so Ultralytics' trainer and loss
    (`model.loss(batch)`) work on it unchanged.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.model.names = dict(enumerate(self.names))

    @property
    def in_channels(self) -> int:
        return int(self.model.yaml["channels"])

    @property
    def stride(self) -> int:
        """Largest feature stride: input sides must be multiples of it (predict pads)."""
        return int(self.model.stride.max())

    def forward(self, x: torch.Tensor):
        """B x C x H x W float32 in [0, 1] (H, W multiples of `stride`) -> raw YOLO output.

        In training mode a dict of "boxes" (B x 4*reg_max x A distributions), "scores"
        (B x nc x A logits) and "feats" (per-level maps), the input of Ultralytics' loss;
        in eval mode Ultralytics' (decoded B x (4 + nc) x A, raw) tuple.
        """
        return self.model(x)

    @torch.inference_mode()
    def predict(
        self, tiles, *, conf: float = 0.25, iou: float = 0.7, max_det: int = 300
    ) -> list[Detections]:
        """Detect defects in a batch of tiles.

        tiles: B x H x W, float32 in [0, 1] or uint8/uint16 (scaled by the dtype's max);
        any H, W: tiles are padded at the bottom and right to a multiple of the stride
        (never resized), so boxes are in the tile's own pixels. conf: minimum score;
        iou: IoU above which NMS suppresses a box of the same class.
        Returns one `Detections` per tile.
        """
        from ultralytics.utils.nms import non_max_suppression

        was_training = self.training
        self.eval()
        try:
            x = tiles_to_tensor(tiles, device=model_device(self))
            h, w = x.shape[-2:]
            s = self.stride
            x = nn.functional.pad(x, (0, -w % s, 0, -h % s), value=_PAD_VALUE)
            if self.in_channels != 1:  # e.g. an RGB-trained Ultralytics checkpoint
                x = x.expand(-1, self.in_channels, -1, -1)
            raw = self.model(x)[0]
            # no time limit: Ultralytics' (2 s + 50 ms a tile) silently returns nothing for
            # the tiles of a batch it has not reached, so results would depend on the batch
            kept = non_max_suppression(raw, conf_thres=conf, iou_thres=iou, max_det=max_det, nc=len(self.names),
                                       max_time_img=float("inf"))
        finally:
            self.train(was_training)
        out = []
        for det in kept:
            det = det.float().cpu()
            boxes = det[:, :4].clone()
            boxes[:, 0::2].clamp_(0, w)
            boxes[:, 1::2].clamp_(0, h)
            out.append(Detections(boxes.numpy(), det[:, 4].numpy().copy(), det[:, 5].long().numpy()))
        return out


def _arch_yaml(arch: str, scale: str) -> dict:
    import ultralytics
    import yaml

    if arch not in _ARCH_YAML:
        raise ModelConfigError(f"unknown YOLO arch {arch!r}; valid: {', '.join(_ARCH_YAML)}")
    path = Path(ultralytics.__file__).parent / "cfg" / "models" / _ARCH_YAML[arch]
    d = yaml.safe_load(path.read_text())
    if scale not in d.get("scales", {}):
        raise ModelConfigError(f"{arch}: unknown scale {scale!r}; valid: {', '.join(d.get('scales', {}))}")
    d["scale"] = scale
    return d


def build_yolo(arch: str, scale: str, defect_classes: list[str], channels: int = 1) -> Detector:
    """YOLO `arch` ("yolov8" | "yolo11") at `scale` ("n", "s", "m", ...), random init.

    channels=1: micrographs are single-channel, so the stem convolution takes one.
    """
    return build_yolo_yaml(_arch_yaml(arch, scale), defect_classes, channels)


def build_yolo_yaml(model_yaml: dict, defect_classes: list[str], channels: int = 1) -> Detector:
    """YOLO from an Ultralytics model dict (as stored in a model's `.yaml` attribute).

    The dict may come from a checkpoint file's metadata, and Ultralytics builds it by
    eval()-ing its activation and calling whatever its layers name, so it is checked
    first (`check_yolo_yaml`): a file cannot run code by naming it.
    """
    from ultralytics.nn.tasks import DetectionModel

    check_yolo_yaml(model_yaml)
    cfg = copy.deepcopy(model_yaml)
    cfg["nc"] = len(defect_classes)  # set here rather than via nc=, which logs an override
    return Detector(DetectionModel(cfg, ch=channels, verbose=False), defect_classes)


def check_yolo_yaml(model_yaml: dict) -> None:
    """Refuse (ModelConfigError) an Ultralytics model dict that names anything but model
    layers: `activation` must be None/False or a literal call of a torch.nn module class
    ("nn.SiLU()", "torch.nn.LeakyReLU(0.1)"); every layer's module a torch.nn,
    torchvision.ops or ultralytics.nn.modules class; layer arguments plain data."""
    import ast

    import torchvision
    import ultralytics.nn.modules as yolo_modules

    # Layers whose constructors fetch weights from the internet (torchvision's model zoo).
    downloads = {"TorchVision"}

    def layer_class(name: str, where: str) -> None:
        if name in downloads:
            raise ModelConfigError(f"YOLO model yaml: {where} names {name!r}, which downloads weights; refused")
        for prefix, namespace in (("torch.nn.", nn), ("nn.", nn), ("torchvision.ops.", torchvision.ops)):
            if name.startswith(prefix):
                obj = getattr(namespace, name[len(prefix):], None)
                break
        else:
            obj = getattr(yolo_modules, name, None)
        if not (name.replace(".", "").replace("_", "").isalnum() and isinstance(obj, type)
                and issubclass(obj, nn.Module)):
            raise ModelConfigError(f"YOLO model yaml: {where} names {name!r}, which is not a model layer "
                                   "(torch.nn, torchvision.ops or ultralytics.nn.modules class)")

    if not isinstance(model_yaml, dict):
        raise ModelConfigError(f"YOLO model yaml: expected a mapping, got {type(model_yaml).__name__}")
    act = model_yaml.get("activation")
    if act not in (None, False):
        try:
            call = ast.parse(str(act), mode="eval").body
            assert isinstance(call, ast.Call)
            [ast.literal_eval(a) for a in call.args]
            [ast.literal_eval(k.value) for k in call.keywords]
            name = ast.unparse(call.func)
        except (AssertionError, SyntaxError, ValueError, TypeError):
            raise ModelConfigError(f"YOLO model yaml: activation {act!r} is not a call of a torch.nn class "
                                   "with literal arguments") from None
        if not name.startswith(("nn.", "torch.nn.")):
            raise ModelConfigError(f"YOLO model yaml: activation {act!r} is not a torch.nn class")
        layer_class(name, "activation")
    for part in ("backbone", "head"):
        layers = model_yaml.get(part)
        if not isinstance(layers, list):
            raise ModelConfigError(f"YOLO model yaml: {part!r} must be a list of [from, repeats, module, args]")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, (list, tuple)) and len(layer) == 4 and isinstance(layer[2], str)
                    and isinstance(layer[3], (list, tuple))):
                raise ModelConfigError(f"YOLO model yaml: {part}[{i}] is not [from, repeats, module, args]")
            layer_class(layer[2], f"{part}[{i}]")
            for a in layer[3]:
                if not isinstance(a, (str, int, float, bool, list, type(None))):
                    raise ModelConfigError(f"YOLO model yaml: {part}[{i}] has an argument of type "
                                           f"{type(a).__name__}")


BUILDERS = {"yolo": build_yolo, "yolo_yaml": build_yolo_yaml}


def load_detector_checkpoint(path: str | Path, expected_sha256: str) -> Detector:
    """A detector from an Ultralytics .pt file, read only after its sha256 matches.

    A registry's sha256 says the file is the one registered, not that it is safe, and an
    Ultralytics .pt pickles its model objects: it is read without running anything it
    holds (`engine.models.ultralytics_pt`), and its weights are moved into a model built
    here from its YAML, so what we keep (and save as safetensors) holds no unpickled
    objects. A .safetensors file is loaded through `engine.models.checkpoint.load_model`.
    """
    from engine.models import checkpoint
    from engine.models.families import ModelConfig, build

    path = Path(path)
    if path.suffix == ".safetensors":
        model = checkpoint.load_model(path, expected_sha256=expected_sha256)
        if not isinstance(model, Detector):
            raise CheckpointError(f"{path}: holds a {model.config.family} model, not a detector")
        return model
    if expected_sha256 is None:
        raise CheckpointError(f"{path}: an Ultralytics .pt is a full pickle; it is loaded only with the sha256 "
                              "(64 hex digits) that a trusted record (the model registry) gives for it")
    from engine.models.ultralytics_pt import read_ultralytics_pt

    # Checked on the open file that is then read (a file swapped after the check is never
    # the one read): byte-for-byte the one recorded.
    with checkpoint.open_checked(path, expected_sha256) as f:
        pt = read_ultralytics_pt(f, path)
    model_yaml = copy.deepcopy(pt.model_yaml)
    config = ModelConfig(
        family="detector", name=path.stem, builder="yolo_yaml",
        args={"model_yaml": model_yaml, "defect_classes": pt.names, "channels": int(model_yaml.get("channels", 3))},
        input_size=pt.imgsz, description=f"imported from Ultralytics checkpoint {path.name}",
    )
    det = build(config)
    try:
        det.model.load_state_dict(pt.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its YAML describes: {exc}") from None
    return det
