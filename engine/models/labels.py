"""Class names the model heads predict, in head order.

A checkpoint records the names it was built with (in its config), so a later change of
these lists never silently re-labels an old model's outputs.
"""

from __future__ import annotations

# Same order as engine.synth's defect classes (reconciled there when it exports them).
DEFECT_CLASSES: tuple[str, ...] = ("pore", "crack", "inclusion", "scratch", "void")

GRADES: tuple[str, ...] = ("A", "B", "C", "D")

# Used only while engine.synth does not export MATERIALS; names follow its renderers.
_FALLBACK_MATERIALS: tuple[str, ...] = (
    "ferritic_steel", "pearlitic_steel", "martensite", "al_alloy_precipitates",
    "ti_alpha_beta", "ni_superalloy", "grey_cast_iron", "nodular_cast_iron",
    "porous_ceramic", "fibre_composite", "thin_film_lattice", "am_alloy",
)


def _names(values) -> tuple[str, ...]:
    """Names from a mapping (keys), or a sequence of names or of objects with `.name`."""
    if isinstance(values, dict):
        return tuple(str(k) for k in values)
    return tuple(v if isinstance(v, str) else str(v.name) for v in values)


def material_names() -> tuple[str, ...]:
    """The twelve material types, from engine.synth when it defines them."""
    try:
        from engine.synth import MATERIALS
    except ImportError:
        return _FALLBACK_MATERIALS
    return _names(MATERIALS)


def defect_class_names() -> tuple[str, ...]:
    """The five defect classes, from engine.synth when it defines them."""
    try:
        from engine.synth import DEFECT_CLASSES as synth_defects
    except ImportError:
        return DEFECT_CLASSES
    return _names(synth_defects)
