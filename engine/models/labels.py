"""Class names the model heads predict, in head order.

Materials and defect classes are engine.synth's (the archives the models learn from);
they are read when a model is created, not when engine.models is imported (engine.synth
pulls in the catalog stack). A checkpoint records the names it was built with (in its
config), so a later change of these lists never silently re-labels an old model.
"""

from __future__ import annotations

GRADES: tuple[str, ...] = ("A", "B", "C", "D")


def material_names() -> tuple[str, ...]:
    """The twelve material types, in engine.synth's order."""
    from engine.synth import MATERIALS

    return tuple(MATERIALS)


def defect_class_names() -> tuple[str, ...]:
    """The five defect classes (pore, crack, inclusion, scratch, void), in engine.synth's order."""
    from engine.synth import DEFECT_CLASSES

    return tuple(DEFECT_CLASSES)
