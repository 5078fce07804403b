"""Pareto dominance for the multi-objective search (``score.mode: pareto``): the non-dominated
sort, the crowding distance and the 2-D hypervolume. Pure Python over plain points, every
objective *minimised* (negate one to maximise it: AP enters as −AP).

The sampler draws parents from the first front, the crowding distance ranking it (the most
isolated first) and breaking ties when the front is larger than ``top_k``; ``export --front``
and the report read the front; ``bench/search_quality.py`` compares strategies by hypervolume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "crowding_distance",
    "dominates",
    "first_front",
    "hypervolume_2d",
    "non_dominated_sort",
]

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` dominates ``b``: no worse in every objective, better in one (minimised)."""
    if len(a) != len(b):
        raise ValueError(f"points of different lengths: {len(a)} and {len(b)}")
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def non_dominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """The points' indices in fronts: front 0 is what nothing dominates, front ``i + 1`` what
    only points of fronts ``0..i`` dominate (Deb et al.'s fast non-dominated sort, O(M·N²)).
    Indices are ascending inside a front; equal points share a front."""
    n = len(points)
    dominated_by: list[list[int]] = [[] for _ in range(n)]  # i dominates each of these
    count = [0] * n  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by[i].append(j)
                count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by[j].append(i)
                count[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(sorted(current))
        following = []
        for i in current:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    following.append(j)
        current = following
    return fronts


def first_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points, ascending (``[]`` for no point)."""
    fronts = non_dominated_sort(points)
    return fronts[0] if fronts else []


def crowding_distance(points: Sequence[Point]) -> list[float]:
    """NSGA-II's crowding distance of each point within ``points`` (one front).

    Per objective, a point at the smallest or the largest value gets ``inf``; any other point adds
    the gap between the nearest *distinct* values below and above its own, over the objective's
    range. Equal values share one distance, whatever their order; an objective on which every
    point is equal adds nothing.
    """
    n = len(points)
    if n == 0:
        return []
    distance = [0.0] * n
    for m in range(len(points[0])):
        values = sorted({float(p[m]) for p in points})
        low, high = values[0], values[-1]
        if high == low:
            continue
        rank = {v: k for k, v in enumerate(values)}
        for i, p in enumerate(points):
            k = rank[float(p[m])]
            if k in (0, len(values) - 1):
                distance[i] = math.inf
            else:
                distance[i] += (values[k + 1] - values[k - 1]) / (high - low)
    return distance


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """The area that the points dominate and that dominates ``reference`` (both objectives
    minimised): 0 when no point is better than the reference in both."""
    if len(reference) != 2 or any(len(p) != 2 for p in points):
        raise ValueError("hypervolume_2d takes 2-D points and a 2-D reference")
    rx, ry = float(reference[0]), float(reference[1])
    inside = sorted((float(x), float(y)) for x, y in points if x < rx and y < ry)
    area, lowest = 0.0, ry  # sweep by the first objective: the lowest second objective so far
    for i, (x, y) in enumerate(inside):
        lowest = min(lowest, y)
        right = inside[i + 1][0] if i + 1 < len(inside) else rx
        area += (right - x) * (ry - lowest)
    return area
