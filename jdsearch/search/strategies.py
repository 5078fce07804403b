"""What a search does at each step, as objects: the strategy, the KD mode and the score mode.

A :class:`Strategy` picks a parent and lists a parent's student moves; a :class:`KDMode` says
whether the pair has a teacher and which teacher moves there are; a :class:`ScoreMode` says what
a trial's value is and how completed trials rank as parents (by H, or on the Pareto front). Each
class registers itself under its ``name``; :func:`strategy_named`, :func:`kd_mode_named` and
:func:`score_mode_named` are the one place where the names a study spec holds
(``search.strategy``, ``kd.mode``, ``score.mode``) become objects. Nothing else in jdsearch
compares those names.

Adding a strategy is one class here (its ``name`` registers it) and its name in
:data:`jdsearch.spec.study.STRATEGIES`, the names a spec accepts; ``docs/search.md`` has an example.
Imports the spec and pool layers' names and :mod:`jdsearch.search.record`; never torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.errors import JDSearchError
from jdsearch.search.pareto import crowding_distance, first_front
from jdsearch.search.record import (
    BASE_MOVE,
    DECISION_SYSATTR,
    MOVE_PARAM,
    PARENT_ATTR,
    cost_name,
    h_of,
)
from jdsearch.spec.pool_space import SubnetConfig, SubnetSpace

if TYPE_CHECKING:
    from jdsearch.search.record import TrialRecord

__all__ = [
    "STUDENT",
    "TEACHER",
    "Decision",
    "KDMode",
    "Registered",
    "ScoreMode",
    "Step",
    "Strategy",
    "family",
    "front_k",
    "kd_mode_named",
    "pick_by_family",
    "score_mode_named",
    "score_mode_of",
    "strategy_named",
    "student_iterations",
    "top_k",
    "tried_moves",
]

STUDENT, TEACHER = "student", "teacher"


@dataclass(frozen=True)
class Decision:
    """What the sampler chose for one trial."""

    parent: int | None  # trial number of the parent; None for the root
    move: str
    kind: str  # "base", "student" or "teacher"


class Registered:
    """A family of classes whose members register themselves under their ``name``: the family's
    base holds the ``registry``, and each subclass that sets ``name`` lands in it."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[Any]]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            cls.registry[cls.name] = cls


def _registry(kind: str, table: dict[str, Any], name: str) -> Any:
    try:
        return table[name]()
    except KeyError:
        raise JDSearchError(f"{kind} must be one of {', '.join(table)}, got {name!r}") from None


# ---------------------------------------------------------------------------- ranking trials
def top_k(trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
    """COMPLETE trials ranked by H (best first; ties: the older trial first)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and h_of(t) is not None]
    done.sort(key=lambda t: (-float(h_of(t)), t.number))  # type: ignore[arg-type]
    return done[:k]


def front_k(trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
    """The COMPLETE trials of a Pareto study (values: AP maximised, cost minimised) that no other
    dominates, the most isolated first (crowding distance; ties: the older trial first), at most
    ``k`` of them."""
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.values is not None and len(t.values) == 2
    ]
    points = [(-float(t.values[0]), float(t.values[1])) for t in done]
    front = first_front(points)
    crowding = crowding_distance([points[i] for i in front])
    ranked = sorted(zip(front, crowding, strict=True), key=lambda p: (-p[1], done[p[0]].number))
    return [done[i] for i, _ in ranked[:k]]


# ---------------------------------------------------------------------------- score modes
class ScoreMode(Registered, ABC):
    """What a trial's value is (``score.mode``), and how completed trials rank as parents."""

    name: ClassVar[str]
    directions: ClassVar[tuple[str, ...]]  # the Optuna study's
    has_front: ClassVar[bool]  # the report draws the AP–cost front
    registry: ClassVar[dict[str, type[ScoreMode]]] = {}

    @abstractmethod
    def rank(self, trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
        """The best ``k`` completed trials as parents, best first."""

    @abstractmethod
    def metric_names(self, metric: str, cost: str) -> list[str]:
        """The names of the study's values (what optuna-dashboard shows)."""

    @abstractmethod
    def objectives(self, ap: float, cost: float, h: float) -> float | tuple[float, float]:
        """A trial's value(s) from its AP, cost and H at its best resolution."""


class HScore(ScoreMode):
    """One value, H (algorithm 1): parents are the top-k by H."""

    name, directions, has_front = "h", ("maximize",), False

    def rank(self, trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
        return top_k(trials, k)

    def metric_names(self, metric: str, cost: str) -> list[str]:
        return ["H"]

    def objectives(self, ap: float, cost: float, h: float) -> float:
        return h


class ParetoScore(ScoreMode):
    """Two values, AP up and the cost down: parents come from the non-dominated set."""

    name, directions, has_front = "pareto", ("maximize", "minimize"), True

    def rank(self, trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
        return front_k(trials, k)

    def metric_names(self, metric: str, cost: str) -> list[str]:
        return [metric, cost_name(cost)]

    def objectives(self, ap: float, cost: float, h: float) -> tuple[float, float]:
        return ap, cost


def score_mode_named(name: str) -> ScoreMode:
    """The score mode ``score.mode`` names.

    Raises:
        JDSearchError: no such mode.
    """
    return _registry("score.mode", ScoreMode.registry, name)


def score_mode_of(directions: Sequence[Any]) -> ScoreMode:
    """The score mode of a study with these directions (``optuna.Study.directions``): one
    objective is ranked by H, two (AP, cost) on the Pareto front.

    Raises:
        JDSearchError: another number of objectives.
    """
    for cls in ScoreMode.registry.values():
        if len(cls.directions) == len(directions):
            return cls()
    raise JDSearchError(f"no score mode has {len(directions)} objectives")


# ---------------------------------------------------------------------------- KD modes
class KDMode(Registered, ABC):
    """Whether a pair has a teacher (``kd.mode``), and whether the search moves it."""

    name: ClassVar[str]
    distils: ClassVar[bool]  # the pair has a teacher cut from the pool
    moves_teacher: ClassVar[bool]  # the sampler offers teacher mutations
    registry: ClassVar[dict[str, type[KDMode]]] = {}

    def root_teacher(self, space: SubnetSpace) -> SubnetConfig | None:
        """The root trial's teacher: the super-net, or none."""
        return space.largest() if self.distils else None

    def teacher_of(self, recorded: str) -> SubnetConfig | None:
        """A child's teacher before its move: its parent's (``recorded``), or none."""
        return SubnetConfig.parse(recorded) if self.distils else None

    def teacher_moves(self, space: SubnetSpace, recorded: str) -> list[str]:
        """The teacher mutations from a parent whose teacher is ``recorded``."""
        if not self.moves_teacher:
            return []
        return sorted(space.neighbours(SubnetConfig.parse(recorded)))


class DynamicKD(KDMode):
    """The teacher is searched with the student (the paper's dynamic distillation)."""

    name, distils, moves_teacher = "dynamic", True, True


class FixedKD(KDMode):
    """The teacher is the super-net, always."""

    name, distils, moves_teacher = "fixed", True, False


class NoKD(KDMode):
    """No teacher, no distillation."""

    name, distils, moves_teacher = "off", False, False


def kd_mode_named(name: str) -> KDMode:
    """The KD mode ``kd.mode`` names.

    Raises:
        JDSearchError: no such mode.
    """
    return _registry("kd.mode", KDMode.registry, name)


# ---------------------------------------------------------------------------- strategies
Moves = Callable[[FrozenTrial], tuple[list[str], list[str]]]


@dataclass(frozen=True)
class Step:
    """What a strategy chooses from, for one trial."""

    trials: Sequence[FrozenTrial]  # every other trial, set aside or not (what was tried)
    parents: Sequence[FrozenTrial]  # those that may be a parent (readable checkpoints)
    rng: np.random.Generator  # seeded by (seed, trial number)
    score: ScoreMode
    top_k: int
    freeze_student: int  # finished iterations during which only the teacher moves
    p_student: float
    moves: Moves  # a parent's feasible (student, teacher) moves, in the vocabulary


class Strategy(Registered, ABC):
    """A search strategy: it picks a parent and a move for a trial (:meth:`choose`), and lists a
    parent's student moves (:meth:`student_moves`)."""

    name: ClassVar[str]
    pool_students: ClassVar[bool] = False  # students are cut from the pool (pool.* moves)
    registry: ClassVar[dict[str, type[Strategy]]] = {}

    @abstractmethod
    def choose(self, step: Step) -> Decision:
        """The parent and move of the trial ``step`` is for."""

    def student_moves(self, record: TrialRecord, pool_moves: Callable[[], list[str]]) -> list[str]:
        """A parent's student moves: the actions its trial recorded. ``pool_moves`` gives the
        pool's mutations of its student, for a strategy whose students are cut from the pool."""
        return list(record.student_moves)


class HillClimb(Strategy):
    """Algorithm 1: a rank-weighted parent from the top-k, a move not yet tried from it."""

    name = "hill_climb"

    def k(self, step: Step) -> int:
        """How many of the best trials a parent is drawn from."""
        return step.top_k

    def choose(self, step: Step) -> Decision:
        rng = step.rng
        ranked = step.score.rank(step.parents, self.k(step))
        assert ranked, "choose() needs at least one COMPLETE trial"
        frozen = student_iterations(step.trials) < step.freeze_student
        weights = np.arange(len(ranked), 0, -1, dtype=float)
        order = list(
            rng.choice(len(ranked), size=len(ranked), replace=False, p=weights / weights.sum())
        )
        # Try parents in a rank-weighted random order until one has an untried move.
        fallback: Decision | None = None
        for i in order:
            parent = ranked[i]
            students, teachers = step.moves(parent)
            if frozen:
                students = []
            tried = tried_moves(step.trials, parent.number)
            fresh = {
                STUDENT: [m for m in students if m not in tried],
                TEACHER: [m for m in teachers if m not in tried],
            }
            kinds = [STUDENT, TEACHER] if rng.random() < step.p_student else [TEACHER, STUDENT]
            for kind in kinds:
                if fresh[kind]:
                    return Decision(parent.number, pick_by_family(fresh[kind], rng), kind)
            if fallback is None:
                pool = [(STUDENT, m) for m in students] + [(TEACHER, m) for m in teachers]
                if pool:
                    kind, move = pool[int(rng.integers(len(pool)))]
                    fallback = Decision(parent.number, move, kind)
        if fallback is None:
            raise RuntimeError("no feasible move from any pair in the top-k list")
        return fallback  # every move of every top-k pair was tried: repeat one (new seed, new data order)


class Greedy(HillClimb):
    """Hill climbing from the single best pair."""

    name = "greedy"

    def k(self, step: Step) -> int:
        return 1


class RandomWalk(Strategy):
    """A random walk with inheritance: a parent uniformly from every completed trial, then a move
    uniformly from its feasible ones (no freeze, no untried-first, no families)."""

    name = "random"

    def choose(self, step: Step) -> Decision:
        rng = step.rng
        done = sorted(
            (t for t in step.parents if t.state == TrialState.COMPLETE and t.values is not None),
            key=lambda t: t.number,
        )
        assert done, "choose() needs at least one COMPLETE trial"
        for i in rng.permutation(len(done)):
            students, teachers = step.moves(done[int(i)])
            options = [(STUDENT, m) for m in students] + [(TEACHER, m) for m in teachers]
            if options:
                kind, move = options[int(rng.integers(len(options)))]
                return Decision(done[int(i)].number, move, kind)
        raise RuntimeError("no feasible move from any completed trial")


class PoolSearch(HillClimb):
    """Algorithm 1 over students cut from the teacher pool (paper appendix F): ``pool.start``
    from the root, then the pool's own mutations of the student's sub-network."""

    name = "pool"
    pool_students = True

    def student_moves(self, record: TrialRecord, pool_moves: Callable[[], list[str]]) -> list[str]:
        return pool_moves()


def strategy_named(name: str) -> Strategy:
    """The strategy ``search.strategy`` names.

    Raises:
        JDSearchError: no such strategy.
    """
    return _registry("search.strategy", Strategy.registry, name)


# ---------------------------------------------------------------------------- helpers
def family(move: str) -> str:
    """The action family of a move: ``add_layer:3`` → ``add_layer``, ``teacher.depth3+`` →
    ``teacher.depth``."""
    return move.split(":")[0].rstrip("+-").rstrip("0123456789")


def pick_by_family(moves: Sequence[str], rng: np.random.Generator) -> str:
    """A family uniformly, then a move of it uniformly."""
    families = sorted({family(m) for m in moves})
    chosen = families[int(rng.integers(len(families)))]
    options = [m for m in moves if family(m) == chosen]
    return options[int(rng.integers(len(options)))]


def tried_moves(trials: Sequence[FrozenTrial], parent: int | None) -> set[str]:
    """Moves already taken from ``parent`` by any trial (running, failed or finished), a move
    still being claimed by a running trial's sampler (``jdsearch:decision``) included."""
    out = set()
    for t in trials:
        if t.user_attrs.get(PARENT_ATTR) != parent:
            continue
        move = t.params.get(MOVE_PARAM, t.system_attrs.get(DECISION_SYSATTR))
        if move is not None:
            out.add(move)
    return out


def student_iterations(trials: Sequence[FrozenTrial]) -> int:
    """Finished iterations after the root (the freeze period counts these)."""
    return sum(
        1
        for t in trials
        if t.state == TrialState.COMPLETE and t.params.get(MOVE_PARAM, BASE_MOVE) != BASE_MOVE
    )
