"""Which rotations and flips a micrograph may undergo and still show a real specimen.

The eight pixel-exact symmetries of the square (the dihedral group D4) are named
below. A material allows the subset its microstructure is invariant under, in the
statistical sense: an equiaxed grain structure looks the same turned by 90 degrees, an
additively manufactured alloy does not, because its melt pools and columnar grains point
along the build direction (image y, build top at the top). The instrument adds its own
constraint: a scanned image (SEM) has horizontal scan lines, so once it carries them
only the operations that keep rows as rows are allowed.

The allowed set is the intersection of the two. Rotations by other angles are left out on
purpose: they interpolate, and they would turn scan lines and detector noise diagonal.
"""

from __future__ import annotations

# name -> (quarter turns counter-clockwise, horizontal flip applied first), the way
# geometry.Dihedral composes np.fliplr and np.rot90.
D4: dict[str, tuple[int, bool]] = {
    "identity": (0, False),
    "rot90": (1, False),
    "rot180": (2, False),
    "rot270": (3, False),
    "hflip": (0, True),  # mirror left-right (x -> W - x)
    "vflip": (2, True),  # mirror top-bottom (y -> H - y)
    "transpose": (1, True),  # x <-> y
    "antitranspose": (3, True),
}
ALL = frozenset(D4)
# Operations that map image rows onto rows: what a scanned image may undergo.
ROW_PRESERVING = frozenset({"identity", "hflip", "vflip", "rot180"})
# Mirror left-right only: keeps "up" (a build or growth direction) pointing up.
KEEP_UP = frozenset({"identity", "hflip"})

# Materials of engine.synth. A structure with no preferred direction in the section
# plane takes all of D4; a mirror is a symmetry of every one of them, since sections of
# these microstructures are not chiral at the scale imaged.
MATERIAL_SYMMETRY: dict[str, frozenset[str]] = {
    "ferritic_steel": ALL,  # equiaxed ferrite grains
    "pearlitic_steel": ALL,  # lamellar colonies, but colonies at all orientations
    "martensite": ALL,  # lath packets at the orientations of random prior grains
    "al_alloy_precipitates": ALL,  # needles along <100> of randomly oriented grains
    "ti_alpha_beta": ALL,  # basket-weave colonies, random orientation
    "ni_superalloy": ALL,  # cuboids aligned to each grain's (random) cube axes
    "grey_cast_iron": ALL,  # randomly oriented graphite flakes
    "nodular_cast_iron": ALL,  # graphite nodules
    "porous_ceramic": ALL,  # equiaxed grains and pores
    "fibre_composite": ALL,  # transverse section of fibres, locally hexagonal packing
    "thin_film_lattice": ALL,  # grains' fringes at random in-plane orientations
    "am_alloy": KEEP_UP,  # build direction along +y: no vertical flip, no quarter turns
}
# A material we know nothing about may have a rolling, build or growth direction:
# allow only what keeps the image's vertical axis, the safe choice.
DEFAULT_SYMMETRY = KEEP_UP


def material_symmetry(material: str | None) -> frozenset[str]:
    """The D4 operations `material` allows; DEFAULT_SYMMETRY when None or not listed."""
    if material is None:
        return DEFAULT_SYMMETRY
    return MATERIAL_SYMMETRY.get(material, DEFAULT_SYMMETRY)


def allowed_ops(material_ops: frozenset[str], scan_lines: bool) -> tuple[str, ...]:
    """The operations allowed on one image, in the fixed order of D4 (for reproducible draws)."""
    ops = material_ops & ROW_PRESERVING if scan_lines else material_ops
    return tuple(name for name in D4 if name in ops)
