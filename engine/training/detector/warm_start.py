"""Starting a detector's training from given weights instead of a random initialisation.

A lab fine-tunes the detector it has (the registered `production` version, a run of its
own) on a new archive, or starts from an Ultralytics checkpoint trained elsewhere. The
file's detector need not be the same model: its tensors are moved into the model being
trained by name and shape (`transfer_weights`), with two adaptations, and what cannot
move keeps its initialisation:

- class outputs by class name: the rows of the head's class convolutions that score a
  class both models have are copied to that class's row, wherever it sits; a class only
  the new model has starts untrained (copying by position would train "crack" from the
  weights that scored "void");
- the stem convolution summed over its input channels when an RGB checkpoint (3 input
  channels) starts a one-channel micrograph model (timm's `adapt_input_conv`: a grey
  image given to an RGB network as three equal channels gives the same activations).

A file of another architecture or scale, where most tensors do not fit, is refused
(`DetectorWarmStartError`) rather than trained from a mostly random start under a name
that says otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from engine.training.warm_start import WarmStartError

# Fraction of the trained model's weights (scalars) the file must set for a warm start:
# below it the file is some other model (a yolov8s file into yolov8n sets ~1%).
MIN_TRANSFERRED = 0.5


class DetectorWarmStartError(WarmStartError):
    """Initial detector weights that do not fit the detector being trained."""


@dataclass(frozen=True)
class WeightTransfer:
    """What a warm start moved into the model.

    file / sha256: the initial weights read; source: that detector's config name and
    classes. copied: tensors copied as they were; adapted: tensor names set after an
    adaptation (class rows by name, stem summed over input channels); left: tensor names
    that kept their initialisation. fraction: scalars set from the file / all scalars.
    """

    file: str
    sha256: str
    source: str
    source_classes: tuple[str, ...]
    copied: int
    adapted: tuple[str, ...]
    left: tuple[str, ...]
    fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


def class_convs(detector) -> list[nn.Conv2d]:
    """The head's convolutions whose output channels are the class scores, one per
    feature level (Ultralytics' Detect: the last layer of each `cv3` branch, and of each
    `one2one_cv3` branch in end-to-end heads)."""
    head = detector.model.model[-1]
    convs = []
    for branches in (getattr(head, "cv3", None), getattr(head, "one2one_cv3", None)):
        for branch in branches or ():
            last = branch[-1] if isinstance(branch, nn.Sequential) else branch
            if isinstance(last, nn.Conv2d) and last.out_channels == len(detector.names):
                convs.append(last)
    return convs


def _parameter_names(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    owned = {id(p) for m in modules for p in m.parameters(recurse=False)}
    return {name for name, p in model.named_parameters() if id(p) in owned}


@torch.no_grad()
def transfer_weights(target, source, *, file: str, sha256: str) -> WeightTransfer:
    """Move `source`'s tensors into `target` (both engine.models `Detector`s) in place.

    Same name and shape: copied. Class-convolution tensors: row by row for the classes
    both have, by name. The stem (the first convolution) with 3 input channels into one
    with 1: summed over them. Everything else keeps its initialisation; when less than
    `MIN_TRANSFERRED` of `target`'s scalars came from `source`, DetectorWarmStartError
    names the file, its model and the first tensor that did not fit.
    """
    from timm.models import adapt_input_conv

    theirs = source.model.state_dict()
    mine = target.model.state_dict()
    class_params = _parameter_names(target.model, class_convs(target))
    their_class_params = _parameter_names(source.model, class_convs(source))
    rows = [(i, source.names.index(name)) for i, name in enumerate(target.names) if name in source.names]
    stem = next(name for name, p in target.model.named_parameters() if p.dim() == 4)

    copied, adapted, left, moved = 0, [], [], 0
    for name, tensor in mine.items():
        value = theirs.get(name)
        if value is None:
            left.append(name)
            continue
        if name in class_params and name in their_class_params and value.shape[1:] == tensor.shape[1:]:
            if not rows:
                left.append(name)
                continue
            for mine_row, their_row in rows:
                tensor[mine_row] = value[their_row]
            if target.names == source.names:  # every row in its place: a plain copy
                copied += 1
            else:
                adapted.append(name)
            moved += tensor.numel() * len(rows) // len(target.names)
        elif value.shape == tensor.shape:
            tensor.copy_(value)
            copied += 1
            moved += tensor.numel()
        elif name == stem and value.dim() == 4 and value.shape[1] == 3 and tensor.shape[1] == 1 \
                and value.shape[:1] + value.shape[2:] == tensor.shape[:1] + tensor.shape[2:]:
            tensor.copy_(adapt_input_conv(1, value.float()).to(tensor.dtype))
            adapted.append(name)
            moved += tensor.numel()
        else:
            left.append(name)
    total = sum(p.numel() for p in mine.values())
    fraction = moved / total if total else 0.0
    source_name = source.config.name
    if fraction < MIN_TRANSFERRED:
        misfit = next((n for n in left if n in theirs), left[0] if left else "")
        shown = (f"{misfit}: {tuple(theirs[misfit].shape)} in the file, {tuple(mine[misfit].shape)} here"
                 if misfit in theirs else f"{misfit}: not in the file")
        raise DetectorWarmStartError(
            f"init_weights: {file}: only {fraction:.0%} of this detector's weights fit those of the file's "
            f"{source_name!r} (at least {MIN_TRANSFERRED:.0%} needed; e.g. {shown}): another architecture or "
            f"scale; start from a file of the same model")
    return WeightTransfer(file=file, sha256=sha256, source=source_name, source_classes=tuple(source.names),
                          copied=copied, adapted=tuple(adapted), left=tuple(left), fraction=round(fraction, 4))


def read_initial_detector(uri: str | Path, expected_sha256: str | None = None):
    """(detector, local path, sha256) of a detector checkpoint at a local path or s3:// URI
    (engine.models.weights_file): a grainflow `.safetensors` or an Ultralytics `.pt` (read
    without running what it pickles: engine.models.ultralytics_pt). The digest checked is
    `expected_sha256`, else, for a .safetensors (no code in it), the `<file>.sha256`
    beside it or the file's own. A .pt is a pickle and, as everywhere in grainflow, read
    only with a digest the caller gives from a record it trusts (a sidecar beside the
    file could come from whoever wrote the file: engine.models.load_detector_checkpoint)."""
    from engine.models import load_detector_checkpoint
    from engine.models.weights_file import weights_file
    from engine.stores.uri import resolve

    suffix = Path(str(uri)).suffix
    if suffix not in (".safetensors", ".pt"):
        raise DetectorWarmStartError(f"init_weights: {uri}: a detector starts from a grainflow .safetensors or "
                                     f"an Ultralytics .pt, not a {suffix or 'suffix-less'} file")
    location = resolve(uri)
    if location.scheme == "file" and not Path(location.path).is_file():
        raise DetectorWarmStartError(f"init_weights: {location.path}: no such file")  # before what else is wrong
    if suffix == ".pt" and expected_sha256 is None:
        raise DetectorWarmStartError(f"init_weights: {uri}: an Ultralytics .pt is a pickle, read only with the "
                                     f"sha256 a record you trust gives for it (init_sha256 / --init-sha256)")
    path, digest = weights_file(uri, expected_sha256)
    return load_detector_checkpoint(path, digest), path, digest


def warm_start(target, uri: str | Path, expected_sha256: str | None = None) -> WeightTransfer:
    """Read the detector at `uri` and move its weights into `target` (`transfer_weights`)."""
    source, _, digest = read_initial_detector(uri, expected_sha256)
    return transfer_weights(target, source, file=str(uri), sha256=digest)


def check_init_weights(model: str, uri: str | Path, expected_sha256: str | None = None) -> tuple[Path, str]:
    """On the driver, before Ray starts: that the file at `uri` can start the registered
    detector config `model` (builds it, moves the weights in). Returns its local path (an
    s3:// file's cached copy) and digest, which the training task is given to check."""
    from engine.models import create_detector
    from engine.runtime import configure_offline

    configure_offline()  # building a detector imports Ultralytics
    source, path, digest = read_initial_detector(uri, expected_sha256)
    transfer_weights(create_detector(model), source, file=str(uri), sha256=digest)
    return path, digest
