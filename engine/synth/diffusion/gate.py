"""The quality gate: which generated samples may join a training set.

    report = gate_archive("out/synthetic", "out/real_archive")

1. A crop classifier (crop_classifier) is trained on the images of the real archive's
   defect crops (one per ground-truth defect, centred on it, the patch size of the
   samples). It reads the image only: the class must be seen in the pixels, not read
   off the mask's shape.
2. Per sample: refused if its mask is empty ("empty mask": nothing is labelled); if the
   image does not stand out inside the mask from outside it ("no contrast": a blank or
   noise image, or a mask that is not on the defect; patches.mask_contrast below the
   class's bar, CONTRAST_FRACTION of the median contrast of its real crops and at least
   MIN_CONTRAST); if the real archive has no crop of the requested class ("no real
   crops": nothing to compare with, and a classifier that never saw the class cannot
   agree); or if the classifier's most likely class is not the requested one
   ("classifier disagrees").
3. Per requested class: KID (kid.py) between the classifier features of the samples
   that passed and those of the real crops of that class. The class's samples are all
   refused ("kid") when that distance exceeds the class's threshold: the KID_QUANTILE
   quantile of KID between random halves of the real crops of the class (how far two
   draws of real crops of the class lie apart; kid.null_quantile) plus a margin of
   KID_MARGIN times the KID between the real crops of the class and those of the other
   classes (the scale on which classes differ; none where there are no other classes).
   KID needs two samples and four real crops: where it is not measurable (NaN) the
   samples that passed step 2 are accepted on the classifier's word alone, and the
   report names that class in `kid_unchecked` with the reason.

The features come from a classifier trained on the same real crops, which sit tighter
in its feature space than crops it never saw: against a small real archive the gate
errs towards refusing samples (held-out real crops included), never towards accepting.

Everything is seeded by `seed`: the same archives and seed give the same verdicts.
Refusals go to the archive's rejects table (output.REJECTS_FILE) with their reason, and
what the gate judged to output.GATE_FILE; training (engine.training.mixing) takes only
archives the gate has judged whole, and leaves the refused images out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.errors import GrainflowError
from engine.stores.uri import resolve

# Real crops score 1 to 8, a blank or noise image ~0 (patches.mask_contrast): at least
# half a standard deviation refuses images without a defect. Classes differ (pores
# stand out more than scratches), and a mask moved off a pore still scores ~1, so the
# bar rises with the class's real crops: a quarter of their median.
MIN_CONTRAST = 0.5
CONTRAST_FRACTION = 0.25
# At the bare 95% quantile, one class in twenty of samples drawn as the real crops are
# would be refused; the margin lets samples a little off their class pass: a tenth of
# the way to the other classes.
KID_QUANTILE = 0.95
KID_MARGIN = 0.1


@dataclass(frozen=True)
class GateReport:
    """samples: gated; accepted: passed; rejected: {reason kind: count}; kid: per class,
    KID of the passing samples to the real crops of the class; kid_reference: per
    class, the threshold it is held to (module doc, step 3);
    classifier_accuracy: the crop classifier on its real training crops;
    real_crops: {class: count}; kid_unchecked: {class: why} for the classes whose
    accepted samples passed on the classifier alone (KID not measurable)."""

    samples: int
    accepted: int
    rejected: dict[str, int] = field(default_factory=dict)
    kid: dict[str, float] = field(default_factory=dict)
    kid_reference: dict[str, float] = field(default_factory=dict)
    classifier_accuracy: float = float("nan")
    real_crops: dict[str, int] = field(default_factory=dict)
    kid_unchecked: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def real_crops(archive, size: int, classes: tuple[str, ...], *, max_crops: int = 2000, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(N x 2 x size x size float32 patches in [-1, 1], N int64 class indices) of the
    archive's defect crops (a seeded subset of at most `max_crops`)."""
    from engine.data.sample_plan import SampleLayout, plan_samples
    from engine.data.training_samples import ReadSamples
    from engine.models import labels
    from engine.synth.diffusion.patches import defect_patches, to_model_space

    specs = plan_samples(archive, SampleLayout(size, mask="instance", anchor="instances"),
                         materials=labels.material_names(), grades=labels.GRADES, defect_classes=classes)
    if len(specs) > max_crops:
        keep = np.sort(np.random.default_rng(seed).choice(len(specs), max_crops, replace=False))
        specs = [specs[i] for i in keep]
    reader = ReadSamples("instance")
    rows = [reader.read(s) for s in specs]
    if not rows:
        return np.zeros((0, 2, size, size), np.float32), np.zeros(0, np.int64)
    images, masks = defect_patches(np.stack([r["image"] for r in rows]), np.stack([r["mask"] for r in rows]),
                                   [s.instance_ids[0] for s in specs])
    return to_model_space(images, masks), np.array([s.instance_classes[0] - 1 for s in specs], np.int64)


def synthetic_patches(archive) -> tuple[list[str], list[str], np.ndarray]:
    """(image ids, requested classes, N x 2 x S x S float32 patches in [-1, 1]) of a
    synthetic archive, normalised as training reads them (training_samples.normalise_tile)."""
    from engine.data.training_samples import normalise_tile
    from engine.stores.image import open_image
    from engine.synth.diffusion.output import LABELS, read_provenance
    from engine.synth.diffusion.patches import to_model_space

    archive = resolve(archive)
    prov = read_provenance(archive)
    ids, classes, images, masks = [], [], [], []
    for row in prov.itertuples():
        loc = archive.join(row.uri)
        img = open_image(loc)
        lab = open_image(loc.join("labels", LABELS))
        h, w = img.shape
        images.append(normalise_tile(img.read_region(0, 0, h, 0, w)))
        masks.append(lab.read_region(0, 0, h, 0, w) == 1)
        ids.append(str(row.image_id))
        classes.append(str(row.defect_class))
    if not ids:
        return [], [], np.zeros((0, 2, 1, 1), np.float32)
    return ids, classes, to_model_space(np.stack(images), np.stack(masks))


def gate_archive(synthetic, real, *, seed: int = 0, max_real_crops: int = 2000, epochs: int = 40) -> GateReport:
    """Gate a synthetic archive against a real one (module doc); writes the rejects table."""
    from engine.models import labels
    from engine.synth.diffusion.crop_classifier import predict, train_crop_classifier
    from engine.synth.diffusion.kid import kid, null_quantile
    from engine.synth.diffusion.patches import mask_contrast
    from engine.synth.diffusion.output import GATE_FILE, read_provenance, write_gate_record, write_rejects

    from engine.stores.catalog import CATALOG_FILE

    synthetic = resolve(synthetic)
    if not synthetic.join(CATALOG_FILE).exists():  # a typo would otherwise be "gated": 0 samples
        raise GrainflowError(f"{synthetic}: no {CATALOG_FILE}; not a synthetic archive to gate "
                             f"(`grainflow synthesize --out` writes one)")
    classes = tuple(labels.defect_class_names())
    gate_file = synthetic.join(GATE_FILE)
    if gate_file.exists():  # an earlier verdict stops counting until this one is recorded whole
        gate_file.filesystem().rm(gate_file.path)
    checksums = {str(r.image_id): str(r.checksum) for r in read_provenance(synthetic).itertuples()}
    ids, wanted, patches = synthetic_patches(synthetic)
    if not ids:
        write_rejects(synthetic, [])
        write_gate_record(synthetic, judged={}, accepted=[], real=resolve(real).uri)
        return GateReport(0, 0)
    size = patches.shape[-1]
    x, y = real_crops(real, size, classes, max_crops=max_real_crops, seed=seed)
    if len(x) < 2:
        raise GrainflowError(f"{real}: {len(x)} real defect crops; the gate needs an archive with ground truth")
    clf = train_crop_classifier(x, y, len(classes), epochs=epochs, seed=seed)
    real_probs, real_feats = predict(clf, x)
    probs, feats = predict(clf, patches)
    real_contrast = np.array([mask_contrast(p) for p in x])
    min_contrast = {k: max(MIN_CONTRAST, CONTRAST_FRACTION * float(np.median(real_contrast[y == k])))
                    if (y == k).any() else MIN_CONTRAST for k in range(len(classes))}
    rejects: dict[str, dict[str, Any]] = {}
    for i, (image_id, cls) in enumerate(zip(ids, wanted)):
        k = classes.index(cls)
        pred = int(probs[i].argmax())
        base = {"image_id": image_id, "defect_class": cls, "predicted_class": classes[pred],
                "class_probability": float(probs[i, k]), "kid": None}
        contrast = mask_contrast(patches[i])
        if not (patches[i, 1] > 0).any():
            rejects[image_id] = {**base, "reason": "empty mask: the generated sample labels no defect"}
        elif contrast < min_contrast[k]:
            rejects[image_id] = {**base, "reason": f"no contrast: the image inside the mask stands out from outside "
                                                   f"it by {contrast:.2f} standard deviations, under {cls}'s "
                                                   f"{min_contrast[k]:.2f}; the mask is on no visible defect"}
        elif not (y == k).any():
            rejects[image_id] = {**base, "reason": f"no real crops: {real} has no real crops of {cls} to compare with"}
        elif pred != k:
            rejects[image_id] = {**base, "reason": f"classifier disagrees: predicted {classes[pred]} "
                                                   f"(p={probs[i, pred]:.2f}), p({cls})={probs[i, k]:.2f}"}
    kids, refs, unchecked = {}, {}, {}
    for cls in sorted(set(wanted)):
        k = classes.index(cls)
        passed = [i for i, (image_id, c) in enumerate(zip(ids, wanted)) if c == cls and image_id not in rejects]
        real_k, real_other = real_feats[y == k], real_feats[y != k]
        kids[cls] = kid(feats[passed], real_k, seed=seed) if passed else float("nan")
        between = kid(real_k, real_other, seed=seed)
        margin = KID_MARGIN * max(between, 0.0) if np.isfinite(between) else 0.0
        refs[cls] = null_quantile(real_k, KID_QUANTILE, seed=seed) + margin
        if passed and not (np.isfinite(kids[cls]) and np.isfinite(refs[cls])):
            unchecked[cls] = (f"KID not measurable ({len(passed)} passing samples, {len(real_k)} real crops of "
                              f"{cls}; it needs two samples and four real crops): accepted on the classifier's "
                              "agreement alone")
        if np.isfinite(kids[cls]) and np.isfinite(refs[cls]) and kids[cls] > refs[cls]:
            for i in passed:
                rejects[ids[i]] = {"image_id": ids[i], "defect_class": cls,
                                   "predicted_class": classes[int(probs[i].argmax())],
                                   "class_probability": float(probs[i, k]), "kid": kids[cls],
                                   "reason": f"kid: {kids[cls]:.4f} to real {cls} crops exceeds {refs[cls]:.4f}, "
                                             f"the {KID_QUANTILE:.0%} quantile of KID between halves of the real "
                                             f"{cls} crops plus {KID_MARGIN} of their KID to other classes"}
    write_rejects(synthetic, sorted(rejects.values(), key=lambda r: r["image_id"]))
    write_gate_record(synthetic, judged={i: checksums[i] for i in ids}, accepted=[i for i in ids if i not in rejects],
                      real=resolve(real).uri, kid_unchecked=unchecked)
    counts: dict[str, int] = {}
    for r in rejects.values():
        kind = r["reason"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return GateReport(
        samples=len(ids), accepted=len(ids) - len(rejects), rejected=counts, kid=kids, kid_reference=refs,
        classifier_accuracy=float((real_probs.argmax(1) == y).mean()),
        real_crops={c: int((y == i).sum()) for i, c in enumerate(classes)}, kid_unchecked=unchecked,
    )
