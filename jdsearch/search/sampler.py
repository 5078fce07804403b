"""Hill climbing over (student, teacher) pairs as an Optuna sampler (paper algorithm 1): a
rank-weighted parent from the top-k (by H; in a Pareto study, from the non-dominated set ranked by
crowding distance), a student or teacher move not yet tried from it. Pure decision logic,
reproducible per (seed, trial number). Notes: ``docs/search.md``, "The sampler".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from jdsearch.core.errors import JDSearchError
from jdsearch.search.record import (
    BASE_MOVE,
    DECISION_SYSATTR,
    FINETUNE_MOVE,
    MOVE_PARAM,
    PARENT_ATTR,
    SET_ASIDE_PREFIX,
    decision_attrs,
    set_aside_trials,
)
from jdsearch.search.strategies import (
    Decision,
    HScore,
    ScoreMode,
    Step,
    Strategy,
    score_mode_of,
    strategy_named,
    tried_moves,
)
from jdsearch.storage.optuna_internals import (
    keep_alive,
    set_running_attrs,
    study_system_attrs,
    trials_with,
)

__all__ = ["Decision", "Feasible", "HillClimbingSampler"]

log = logging.getLogger(__name__)

Feasible = Callable[[FrozenTrial], tuple[Sequence[str], Sequence[str]]]

#: How often a trial chooses again after another worker claimed the same (parent, move) at once.
CLAIM_ROUNDS = 8


class HillClimbingSampler(BaseSampler):
    """Joint-DetNAS hill climbing over (student, teacher) pairs (paper algorithm 1).

    Args:
        moves: the fixed vocabulary of the ``move`` parameter; it must contain ``base``.
        feasible: ``feasible(parent_trial) -> (student moves, teacher moves)`` legal from a parent.
        top_k: size of the list parents are drawn from (rank-weighted).
        freeze_student: finished iterations during which only the teacher moves.
        p_student: the chance of evolving the student once it is no longer frozen.
        seed: trial ``n``'s draws come from ``(seed, n)`` only.
        strategy: a :class:`~jdsearch.search.strategies.Strategy`, or the name of one:
            ``hill_climb`` (algorithm 1), ``greedy`` (the parent is always the best pair),
            ``random`` (a random walk: a uniform parent among all completed trials, a uniform
            feasible move) or ``pool`` (algorithm 1 over students cut from the teacher pool: the
            ``feasible`` callback offers the pool's mutations as the student moves).
        root_wait: a worker waiting for the root trial looks again every ``root_wait[0]``
            seconds, for ``root_wait[1]`` seconds at most.

    In a study with two objectives (``score.mode: pareto``: AP and the cost) parents come from
    the non-dominated set instead of the top-k by H, ranked by crowding distance
    (:func:`~jdsearch.search.strategies.front_k`); the rest of the step is the same.

    Raises:
        ValueError: a vocabulary without ``base`` or with duplicates, or out-of-range settings.

    Example:
        ``optuna.create_study(sampler=HillClimbingSampler(moves, feasible, seed=0), ...)``; the
        objective calls ``trial.suggest_categorical("move", moves)`` and reads
        ``trial.user_attrs["parent"]``. Notes: ``docs/search.md``.
    """

    def __init__(
        self,
        moves: Sequence[str],
        feasible: Feasible,
        *,
        top_k: int = 5,
        freeze_student: int = 5,
        p_student: float = 0.5,
        seed: int | None = None,
        strategy: str | Strategy = "hill_climb",
        root_wait: tuple[float, float] = (2.0, 24 * 3600.0),
    ) -> None:
        if isinstance(strategy, str):
            try:
                strategy = strategy_named(strategy)
            except JDSearchError as e:
                raise ValueError(str(e).removeprefix("search.")) from None
        if BASE_MOVE not in moves:
            raise ValueError(f"the move vocabulary must contain {BASE_MOVE!r}")
        if len(set(moves)) != len(moves):
            raise ValueError("the move vocabulary has duplicates")
        if top_k < 1 or not 0.0 <= p_student <= 1.0 or freeze_student < 0:
            raise ValueError("top_k ≥ 1, 0 ≤ p_student ≤ 1 and freeze_student ≥ 0 are required")
        self.moves = tuple(moves)
        self.feasible = feasible
        self.k = top_k
        self.freeze_student = freeze_student
        self.p_student = p_student
        self.seed = 0 if seed is None else int(seed)
        self.root_wait_s, self.root_timeout_s = root_wait
        self.strategy = strategy
        self._fallback = RandomSampler(seed=seed)

    # ------------------------------------------------------------ Optuna sampler contract
    def reseed_rng(self) -> None:
        """Reseed the fallback sampler's random generator."""
        self._fallback.reseed_rng()

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """The ``move`` parameter over the move vocabulary, whatever the trial."""
        return {MOVE_PARAM: CategoricalDistribution(self.moves)}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """``{move: …}`` from :meth:`decide`, with the parent and kind recorded on the trial; ``{}``
        for a retried trial (its move is fixed) or a space without ``move``."""
        if MOVE_PARAM not in search_space:
            return {}
        if PARENT_ATTR in trial.user_attrs:  # a retried trial: same parent, same (fixed) move
            return {}
        for _ in range(CLAIM_ROUNDS):
            decision, seen = self._decide(study, trial)
            # The choice, and the move as a claim other workers count as tried: one write.
            user = decision_attrs(decision.parent, decision.kind)
            set_running_attrs(study, trial, user, {DECISION_SYSATTR: decision.move})
            if decision.parent is None or decision.move in tried_moves(seen, decision.parent):
                break  # the root, or a move repeated because every one was tried: no race
            if not self._claimed_elsewhere(study, trial, decision):
                break
            log.info(
                "trial %d: another worker chose %s from %s at the same time; choosing again",
                trial.number,
                decision.move,
                decision.parent,
            )
        log.info("trial %d: parent %s, move %s", trial.number, decision.parent, decision.move)
        return {MOVE_PARAM: decision.move}

    def _claimed_elsewhere(self, study: optuna.Study, trial: FrozenTrial, d: Decision) -> bool:
        """Whether, now that ``trial`` has claimed ``d`` (a move untried when it was chosen),
        another trial has taken or claimed the same (parent, move). Two workers that chose the
        same at once both write their claim before they read the study again, so at least one
        of them sees the other's and chooses again (both may); the parameter itself, which
        Optuna writes after this, cannot change."""
        # Only what tried_moves reads, from the database now (one query where it can).
        now = trials_with(study, (PARENT_ATTR,), (MOVE_PARAM,), (DECISION_SYSATTR,))
        return d.move in tried_moves([t for t in now if t.number != trial.number], d.parent)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """A parameter other than ``move``, drawn by the fallback ``RandomSampler``."""
        # Only parameters other than `move` get here (none in jdsearch's objective).
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    # ------------------------------------------------------------ decision logic
    def decide(self, study: optuna.Study, trial: FrozenTrial) -> Decision:
        """Choose the parent and the move of ``trial`` (waits while the root is running)."""
        return self._decide(study, trial)[0]

    def _decide(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> tuple[Decision, list[FrozenTrial]]:
        """:meth:`decide`, with the other trials it chose from."""
        deadline = time.monotonic() + self.root_timeout_s
        while True:
            # Fine-tuned pairs had more training than a step of the search: never a parent.
            trials = [
                t
                for t in study.get_trials(deepcopy=False)
                if t.params.get(MOVE_PARAM) != FINETUNE_MOVE
            ]
            others = [t for t in trials if t.number != trial.number]
            # A trial whose checkpoint was found unreadable is never a parent again.
            aside = set_aside_trials(study_system_attrs(study, SET_ASIDE_PREFIX))
            score = score_mode_of(study.directions)
            if score.rank([t for t in others if t.number not in aside], 1):
                return self.choose(others, trial.number, aside, score=score), others
            # The root is (being) taken by a running base trial, or by a lower-numbered trial
            # that is still choosing its move: two workers starting together must not both take
            # it. A base trial re-queued after its worker died (WAITING) does not count: every
            # worker may be waiting here, and then none would ever run it; the lowest waiter
            # takes the root instead (the re-queued copy later runs as a second root).
            root_pending = any(
                (t.params.get(MOVE_PARAM) == BASE_MOVE and t.state == TrialState.RUNNING)
                or (
                    MOVE_PARAM not in t.params
                    and t.state == TrialState.RUNNING
                    and t.number < trial.number
                )
                for t in others
            )
            if not root_pending:
                return Decision(None, BASE_MOVE, BASE_MOVE), others
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "timed out waiting for the root trial (the base detector) to finish"
                )
            time.sleep(self.root_wait_s)
            # Keep this trial alive and fail the trials of dead workers: a worker killed while its
            # trial runs the root would otherwise leave every other worker waiting here.
            keep_alive(study, trial)

    def choose(
        self,
        trials: Sequence[FrozenTrial],
        number: int,
        aside: frozenset[int] = frozenset(),
        *,
        score: ScoreMode | None = None,
    ) -> Decision:
        """The step of the sampler's strategy over the other trials, for trial ``number``; the
        trials in ``aside`` (unreadable checkpoints) are never the parent. ``score``: the study's
        score mode (default H: parents ranked by H)."""
        step = Step(
            trials=trials,
            parents=[t for t in trials if t.number not in aside],
            rng=np.random.default_rng([self.seed, number]),
            score=score or HScore(),
            top_k=self.k,
            freeze_student=self.freeze_student,
            p_student=self.p_student,
            moves=self._moves,
        )
        return self.strategy.choose(step)

    def _moves(self, parent: FrozenTrial) -> tuple[list[str], list[str]]:
        """The feasible student and teacher moves of ``parent`` that are in the vocabulary."""
        students, teachers = self.feasible(parent)
        return [m for m in students if m in self.moves], [m for m in teachers if m in self.moves]
