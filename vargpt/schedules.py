"""Scale schedules: the (h, w) latent grid of every scale in next-scale prediction (INFINITY §2).

A schedule is a ``list[tuple[int, int]]`` of latent grid sizes, coarse to fine; the token sequence of an image is
the concatenation of its scales, each flattened row-major. Infinity defines 13-scale templates for 8 aspect ratios
(h / w) plus their transposes, and a resolution preset ``pn`` keeps a prefix of the template (the video time axis of
the reference is dropped: images always have t = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Schedule = list[tuple[int, int]]

# Number of scales kept per resolution preset (INFINITY §2): 256 / 512 / 768 / 1024 px at 1:1.
PN_NUM_SCALES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

# Latent stride of the released BSQ-VAE: one latent cell covers 16x16 pixels (INFINITY §1.1).
VAE_STRIDE = 16

# The 13-scale templates of `infinity/utils/dynamic_resolution.py::ratio2hws`, keyed by h / w (INFINITY §2).
_TALL_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.0: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
          (48, 48), (64, 64)),
    1.25: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
           (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.5: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
          (63, 42), (78, 52)),
    1.75: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
           (70, 40), (84, 48)),
    2.0: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
          (74, 37), (90, 45)),
    2.5: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
          (80, 32), (100, 40)),
    3.0: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
          (90, 30), (111, 37)),
}


def _with_transposes(tall: dict[float, tuple[tuple[int, int], ...]]) -> dict[float, tuple[tuple[int, int], ...]]:
    """Each ratio r != 1 and its transpose under the key ``int(1/r*1000)/1000``, in the reference's order."""
    templates: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio, scales in tall.items():
        templates[ratio] = scales
        if ratio != 1.0:
            templates[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in scales)
    return templates


# 15 templates keyed by h / w: 1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333.
ASPECT_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _with_transposes(_TALL_TEMPLATES)


def _check_aspect(aspect: float) -> float:
    if isinstance(aspect, bool) or not isinstance(aspect, (int, float)) or not math.isfinite(aspect) or aspect <= 0:
        raise ValueError(f"aspect (h / w) must be a finite number > 0, got {aspect!r}")
    return float(aspect)


def _check_pn(pn: str) -> int:
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown resolution preset pn={pn!r}; allowed: {sorted(PN_NUM_SCALES)}")
    return PN_NUM_SCALES[pn]


def nearest_aspect_template(aspect: float) -> float:
    """The template key closest to ``aspect`` = h / w (argmin |aspect - key|, first key on ties, as the reference)."""
    aspect = _check_aspect(aspect)
    return min(ASPECT_TEMPLATES, key=lambda key: abs(aspect - key))


def scale_schedule(pn: str, aspect: float = 1.0) -> Schedule:
    """The schedule of resolution preset ``pn`` for an image of aspect ``h / w`` (nearest template's prefix)."""
    num_scales = _check_pn(pn)
    return list(ASPECT_TEMPLATES[nearest_aspect_template(aspect)][:num_scales])


def final_grid(aspect: float = 1.0, pn: str = "1M") -> tuple[int, int]:
    """The last (finest) grid of that schedule; the decoder's 2-D RoPE positions live on ``final_grid(aspect, "1M")``."""
    return scale_schedule(pn, aspect)[-1]


def validate_schedule(schedule: Sequence[Sequence[int]]) -> Schedule:
    """Check a schedule is a non-empty list of positive (h, w) int pairs and return it as a list of tuples."""
    if len(schedule) == 0:
        raise ValueError("a scale schedule needs at least one (h, w) scale, got an empty one")
    checked: Schedule = []
    for index, scale in enumerate(schedule):
        if len(scale) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scale):
            raise ValueError(f"scale {index} of the schedule must be a pair of ints >= 1 (h, w), got {scale!r}")
        checked.append((scale[0], scale[1]))
    return checked


def token_count(schedule: Sequence[Sequence[int]]) -> int:
    """Total tokens L = sum of h * w over the scales (521 for 0.06M at 1:1)."""
    return sum(h * w for h, w in validate_schedule(schedule))


def placeholder_count(schedule: Sequence[Sequence[int]], multiple: int = 128) -> int:
    """Token count rounded up to ``multiple``: the LLM placeholder count (640 for 0.06M, 2560 for 0.25M; VARGPT §1.7)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    return -(-token_count(schedule) // multiple) * multiple


def scale_starts(schedule: Sequence[Sequence[int]]) -> list[int]:
    """Offset of each scale's first token in the flattened sequence (length K; starts at 0)."""
    starts, offset = [], 0
    for h, w in validate_schedule(schedule):
        starts.append(offset)
        offset += h * w
    return starts


def pixel_size(schedule: Sequence[Sequence[int]], stride: int = VAE_STRIDE) -> tuple[int, int]:
    """Image size (height, width) in pixels of the schedule's last scale at the VAE's ``stride``."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    h, w = validate_schedule(schedule)[-1]
    return h * stride, w * stride


def _template_prefix(height: int, width: int) -> Schedule | None:
    """The nearest aspect template's prefix that ends exactly at (height, width), if that template contains it."""
    template = ASPECT_TEMPLATES[nearest_aspect_template(height / width)]
    if (height, width) in template:
        return list(template[: template.index((height, width)) + 1])
    return None


def _default_long_sides(longest: int) -> list[int]:
    """The 1:1 template's sides below ``longest``, then ``longest``: Infinity's spacing, cut at the latent."""
    return [side for side, _ in ASPECT_TEMPLATES[1.0] if side < longest] + [longest]


def _geometric_long_sides(longest: int, num_scales: int) -> list[int]:
    """``num_scales`` strictly increasing sides from 1 to ``longest``, rounded from a geometric progression."""
    if num_scales == 1:
        return [longest]
    sides = []
    for k in range(num_scales):
        ideal = int(longest ** (k / (num_scales - 1)) + 0.5)
        lowest = sides[-1] + 1 if sides else 1
        highest = longest - (num_scales - 1 - k)  # leave room for the remaining scales to stay distinct
        sides.append(min(max(ideal, lowest), highest))
    return sides


def schedule_for_latent(height: int, width: int, num_scales: int | None = None) -> Schedule:
    """A schedule ending exactly at a latent grid of ``height`` x ``width`` (for any VAE stride or image size).

    Rule, in order:
    1. If the aspect template nearest to height / width contains (height, width), its prefix up to that entry (so a
       square 8x8 latent gets (1,1),(2,2),(4,4),(6,6),(8,8) and a 16x16 latent the 0.06M schedule) - unless
       ``num_scales`` asks for a different length.
    2. Otherwise the longer side runs through the 1:1 template's sides below it and then itself (or, when
       ``num_scales`` is given, through ``num_scales`` strictly increasing sides rounded from a geometric progression
       1 -> longest); the shorter side is the longer one times shorter / longer, rounded half up, at least 1.
    Both sides never decrease, the longer one strictly increases (no duplicate scales), the first scale is (1, 1)
    and the last is (height, width).
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"latent {name} must be an int >= 1, got {value!r}")
    longest, shortest = max(height, width), min(height, width)
    if num_scales is not None:
        least = 1 if longest == 1 else 2
        if isinstance(num_scales, bool) or not isinstance(num_scales, int) or not least <= num_scales <= longest:
            raise ValueError(
                f"num_scales for a {height}x{width} latent must be an int in [{least}, {longest}] (from (1, 1), the "
                f"longer side grows by at least 1 per scale), got {num_scales!r}"
            )
    prefix = _template_prefix(height, width)
    if prefix is not None and (num_scales is None or num_scales == len(prefix)):
        return prefix
    sides = _default_long_sides(longest) if num_scales is None else _geometric_long_sides(longest, num_scales)
    schedule = []
    for side in sides:
        other = max(1, int(side * shortest / longest + 0.5))
        schedule.append((side, other) if height >= width else (other, side))
    return schedule
