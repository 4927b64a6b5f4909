"""The closed vocabulary of the shapes world: four shapes, eight colours, one background.

Everything is chosen so that a tiny generator can learn it at 32-64 px and the scorer can read it back after blur:

Shapes (all upright, each filling a square bounding box of side ``size``):

- ``circle``   fill 0.785 of its box, symmetric, no corners;
- ``square``   fill 1.0, symmetric, four corners;
- ``triangle`` isosceles, apex up: fill 0.5 and, unlike every other shape, its centre of mass sits 1/6 of the box
  below the box centre (a first moment, which blur does not change);
- ``cross``    a plus sign with arms ``CROSS_ARM`` of the box wide: the only non-convex silhouette; its fill (0.64)
  lies between the triangle's and the circle's, its empty corner squares (0.3 of the box side) are far larger
  than the circle's, and it is symmetric where the triangle is not. Rejected alternatives: a diamond has the
  triangle's fill and its tips round off under blur towards a circle; a star's thin points vanish at 32 px.

Colours: eight of GenEval's ten colour words (evaluation.md §1.1), saturated and at least 123 apart in RGB from each
other and 117 from the background, so that a colour drift of a few tens per channel still classifies correctly.
Orange and brown are left out: orange sits 90 from yellow and brown 106 from red at best.

Background: a plain mid grey that contrasts with both black and white.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# GenEval colour names -> RGB. Pairwise distances >= 123 (blue/purple, pink/white); >= 117 from BACKGROUND.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "yellow": (245, 220, 20),
    "green": (20, 165, 55),
    "blue": (25, 70, 230),
    "purple": (140, 40, 200),
    "pink": (255, 135, 205),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}

BACKGROUND: tuple[int, int, int] = (140, 140, 140)

CROSS_ARM = 0.4  # arm width of the cross as a fraction of its box: arms >= 3.5 px for a 9-px cross at 32 px

# Fraction of the bounding box each shape covers, and how far its centre of mass lies below the box centre
# (in box sides). The scorer uses both to turn a measured area and centroid into a box for each shape hypothesis.
FILL_RATIO: dict[str, float] = {
    "circle": 3.141592653589793 / 4,
    "square": 1.0,
    "triangle": 0.5,
    "cross": 2 * CROSS_ARM - CROSS_ARM**2,
}
CENTROID_DROP: dict[str, float] = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0, "cross": 0.0}

NUMBER_WORDS: dict[int, str] = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}


def plural(shape: str) -> str:
    """The plural noun of a shape name ("crosses", "circles")."""
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")
