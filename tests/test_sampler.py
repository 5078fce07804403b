"""HillClimbingSampler: the decision logic of algorithm 1 on fake trials."""

from __future__ import annotations

from collections import Counter

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from jdsearch.search.record import (
    BASE_MOVE,
    DECISION_SYSATTR,
    KIND_ATTR,
    MOVE_PARAM,
    PARENT_ATTR,
)
from jdsearch.search.sampler import HillClimbingSampler
from jdsearch.search.strategies import top_k

STUDENT_MOVES = ["channel_prune", "layer_prune", "add_layer:1", "add_layer:2"]
TEACHER_MOVES = ["teacher:fpn=16", "teacher:depth1=1", "teacher:width2=1.5"]
VOCAB = [BASE_MOVE, *STUDENT_MOVES, *TEACHER_MOVES]
DIST = {MOVE_PARAM: CategoricalDistribution(VOCAB)}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def feasible(parent: FrozenTrial) -> tuple[list[str], list[str]]:
    return STUDENT_MOVES, TEACHER_MOVES


def add(
    study: optuna.Study,
    move: str,
    parent: int | None,
    value: float | None,
    state: TrialState = TrialState.COMPLETE,
) -> None:
    study.add_trial(
        create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params={MOVE_PARAM: move},
            distributions=DIST,
            user_attrs={PARENT_ATTR: parent},
        )
    )


def make(**kw: object) -> tuple[optuna.Study, HillClimbingSampler]:
    sampler = HillClimbingSampler(
        VOCAB, feasible, seed=kw.pop("seed", 0), root_wait=(0.01, 24 * 3600.0), **kw
    )  # type: ignore[arg-type]
    return optuna.create_study(direction="maximize", sampler=sampler), sampler


def ask_move(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_categorical(MOVE_PARAM, VOCAB)
    return trial


def test_first_trial_is_the_root() -> None:
    study, _ = make()
    trial = ask_move(study)
    assert trial.params[MOVE_PARAM] == BASE_MOVE
    assert trial.user_attrs[PARENT_ATTR] is None
    assert trial.user_attrs[KIND_ATTR] == BASE_MOVE


def test_student_frozen_for_the_first_iterations() -> None:
    study, _ = make(freeze_student=3, p_student=1.0)
    add(study, BASE_MOVE, None, 0.5)
    moves = []
    for _ in range(3):
        trial = ask_move(study)
        moves.append(trial.params[MOVE_PARAM])
        study.tell(trial, 0.4)
    assert all(m in TEACHER_MOVES for m in moves)
    trial = ask_move(study)  # freeze over, p_student = 1
    assert trial.params[MOVE_PARAM] in STUDENT_MOVES
    assert trial.user_attrs[KIND_ATTR] == "student"


def test_top_k_ranks_complete_trials_only() -> None:
    study, _ = make()
    add(study, BASE_MOVE, None, 0.1)
    add(study, "channel_prune", 0, 0.9)
    add(study, "layer_prune", 0, None, TrialState.FAIL)
    add(study, "add_layer:1", 0, 0.5)
    add(study, "add_layer:2", 0, 0.9)
    ranked = top_k(study.get_trials(), 2)
    assert [t.number for t in ranked] == [1, 4]


def test_parent_is_rank_weighted_from_top_k() -> None:
    study, sampler = make(top_k=3, freeze_student=0)
    add(study, BASE_MOVE, None, 0.1)  # rank 4: never a parent
    add(study, "channel_prune", 0, 0.9)  # rank 1
    add(study, "layer_prune", 0, 0.7)  # rank 2
    add(study, "add_layer:1", 0, 0.5)  # rank 3
    trials = study.get_trials()
    parents = Counter(sampler.choose(trials, n).parent for n in range(100, 1300))
    assert set(parents) == {1, 2, 3}
    # weights 3 : 2 : 1 for 1200 draws -> 600 / 400 / 200
    assert parents[1] > parents[2] > parents[3]
    assert 520 < parents[1] < 680 and 140 < parents[3] < 260


def test_moves_not_repeated_from_the_same_parent_while_untried_remain() -> None:
    study, _ = make(top_k=1, freeze_student=0, p_student=0.5)
    add(study, BASE_MOVE, None, 1.0)
    seen = []
    for _ in range(len(STUDENT_MOVES) + len(TEACHER_MOVES)):
        trial = ask_move(study)
        assert trial.user_attrs[PARENT_ATTR] == 0
        seen.append(trial.params[MOVE_PARAM])
        study.tell(trial, 0.5)  # worse than the root: the root stays the only top-1 parent
    assert sorted(seen) == sorted(STUDENT_MOVES + TEACHER_MOVES)
    trial = ask_move(study)  # all tried: a repeat is allowed rather than stopping the search
    assert trial.params[MOVE_PARAM] in STUDENT_MOVES + TEACHER_MOVES


def racing(study: optuna.Study, sampler: HillClimbingSampler) -> list[tuple[int | None, str]]:
    """Make another worker's trial claim, right after this sampler's first choice, the same
    (parent, move), as a worker that read the study at the same moment would; every choice."""
    storage = study._storage
    other = storage.create_new_trial(study._study_id)
    choose, choices = sampler.choose, []

    def choose_while_another_does(*args: object, **kw: object) -> object:
        decision = choose(*args, **kw)  # type: ignore[arg-type]
        if not choices:
            storage.set_trial_user_attr(other, PARENT_ATTR, decision.parent)
            storage.set_trial_system_attr(other, DECISION_SYSATTR, decision.move)
        choices.append((decision.parent, decision.move))
        return decision

    sampler.choose = choose_while_another_does  # type: ignore[method-assign]
    return choices


def test_a_move_another_worker_claimed_at_once_is_chosen_again() -> None:
    study, sampler = make(top_k=1, freeze_student=0)
    add(study, BASE_MOVE, None, 1.0)
    choices = racing(study, sampler)
    trial = ask_move(study)
    # The first choice lost the race to the other worker's claim; the second is another move.
    assert len(choices) == 2
    assert trial.params[MOVE_PARAM] == choices[1][1] != choices[0][1]
    assert trial.user_attrs[PARENT_ATTR] == 0


def test_a_knowing_repeat_is_not_chosen_again() -> None:
    study, sampler = make(top_k=1, freeze_student=0)
    add(study, BASE_MOVE, None, 1.0)
    for move in STUDENT_MOVES + TEACHER_MOVES:  # every move of the only parent was tried
        add(study, move, 0, 0.5)
    choices = racing(study, sampler)
    trial = ask_move(study)
    assert len(choices) == 1  # a repeat by design races nobody: one choice, kept
    assert trial.params[MOVE_PARAM] == choices[0][1]


def test_infeasible_moves_are_never_chosen() -> None:
    def only_some(parent: FrozenTrial) -> tuple[list[str], list[str]]:
        return ["add_layer:2"], ["teacher:fpn=16"]

    sampler = HillClimbingSampler(VOCAB, only_some, freeze_student=0, seed=1)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    add(study, BASE_MOVE, None, 1.0)
    for _ in range(10):
        trial = ask_move(study)
        assert trial.params[MOVE_PARAM] in ("add_layer:2", "teacher:fpn=16")
        study.tell(trial, 0.1)


def test_seeded_runs_are_reproducible() -> None:
    def run(seed: int) -> list[tuple[object, str]]:
        study, _ = make(seed=seed, freeze_student=1)
        add(study, BASE_MOVE, None, 0.5)
        out = []
        for i in range(8):
            trial = ask_move(study)
            out.append((trial.user_attrs[PARENT_ATTR], trial.params[MOVE_PARAM]))
            study.tell(trial, 0.5 + 0.01 * ((i * 7) % 5))
        return out

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_retried_trial_keeps_parent_and_move() -> None:
    study, _ = make(freeze_student=0)
    add(study, BASE_MOVE, None, 0.5)
    trial = ask_move(study)
    move, parent = trial.params[MOVE_PARAM], trial.user_attrs[PARENT_ATTR]
    study.tell(trial, state=TrialState.FAIL)
    # What optuna's RetryHeartbeatStaleTrialCallback does with a failed trial:
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.trials[-1])
    retry = ask_move(study)
    assert retry.params[MOVE_PARAM] == move
    assert retry.user_attrs[PARENT_ATTR] == parent
    assert (
        optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(study.trials[-1])
        == trial.number
    )


def test_second_worker_waits_for_the_running_root() -> None:
    study, sampler = make()
    root = ask_move(study)
    assert root.params[MOVE_PARAM] == BASE_MOVE
    sampler.root_timeout_s = 0.05
    with pytest.raises(RuntimeError, match="waiting for the root"):
        ask_move(study)


def test_failed_root_is_retried_as_root() -> None:
    study, _ = make()
    root = ask_move(study)
    study.tell(root, state=TrialState.FAIL)
    again = ask_move(study)
    assert again.params[MOVE_PARAM] == BASE_MOVE


def test_vocabulary_validation() -> None:
    with pytest.raises(ValueError, match="base"):
        HillClimbingSampler(STUDENT_MOVES, feasible)
    with pytest.raises(ValueError, match="duplicates"):
        HillClimbingSampler([*VOCAB, "layer_prune"], feasible)


def test_action_families_are_equally_likely() -> None:
    """rearrange has six variants and channel_prune one; each family is still picked ~1/4."""
    import numpy as np

    from jdsearch.search.strategies import family, pick_by_family

    moves = ["channel_prune", "layer_prune", *[f"add_layer:{s}" for s in range(1, 5)]]
    moves += [f"rearrange:{a}->{b}" for a, b in ((1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3))]
    rng = np.random.default_rng(0)
    counts = Counter(family(pick_by_family(moves, rng)) for _ in range(4000))
    assert set(counts) == {"channel_prune", "layer_prune", "add_layer", "rearrange"}
    assert all(850 < c < 1150 for c in counts.values()), counts
    assert family("teacher.depth3+") == "teacher.depth" and family("teacher.fpn-") == "teacher.fpn"


def test_waiting_worker_takes_over_the_root_of_a_killed_worker(tmp_path) -> None:
    """The root's worker dies mid-trial while a second worker waits for the root: the waiter
    fails the stale trial (heartbeat) and takes the root itself instead of waiting forever."""
    import time

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    storage = RDBStorage(
        f"sqlite:///{tmp_path / 'hb.db'}",
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
    )
    sampler = HillClimbingSampler(VOCAB, feasible, seed=0, root_wait=(0.2, 20))
    study = optuna.create_study(storage=storage, sampler=sampler, direction="maximize")
    root = ask_move(study)
    assert root.params[MOVE_PARAM] == BASE_MOVE
    storage.record_heartbeat(root._trial_id)  # its worker beat once, then was killed
    started = time.monotonic()
    second = ask_move(study)  # a waiter: used to wait until root_timeout_s
    assert second.params[MOVE_PARAM] == BASE_MOVE and second.user_attrs[PARENT_ATTR] is None
    assert time.monotonic() - started < 10
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[root.number] == TrialState.FAIL
    assert TrialState.WAITING in states.values()  # the killed root re-queued, as for any trial


def test_a_live_waiter_is_not_failed_while_it_waits(tmp_path) -> None:
    """Waiting for a long root must not make the waiter itself look dead."""
    import threading

    from optuna.storages import RDBStorage

    storage = RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1)
    sampler = HillClimbingSampler(VOCAB, feasible, seed=0, root_wait=(0.2, 4))
    study = optuna.create_study(storage=storage, sampler=sampler, direction="maximize")
    root = ask_move(study)
    stop = threading.Event()

    def beat() -> None:  # the root's worker is alive (optuna's heartbeat thread)
        while not stop.is_set():
            storage.record_heartbeat(root._trial_id)
            stop.wait(0.3)

    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(RuntimeError, match="waiting for the root"):
            ask_move(study)
    finally:
        stop.set()
        t.join()
    states = [tr.state for tr in study.get_trials(deepcopy=False)]
    assert states == [TrialState.RUNNING, TrialState.RUNNING]  # nobody was failed


def test_greedy_always_takes_the_best_pair() -> None:
    study, _ = make(strategy="greedy", freeze_student=0)
    add(study, BASE_MOVE, None, 0.1)
    add(study, "layer_prune", 0, 0.3)
    add(study, "channel_prune", 0, 0.2)
    parents = []
    for _ in range(6):
        trial = ask_move(study)
        parents.append(trial.user_attrs[PARENT_ATTR])
        study.tell(trial, 0.0)  # worse than the best: the best stays trial 1
    assert parents == [1] * 6


def test_random_walk_draws_parents_from_every_completed_trial_uniformly() -> None:
    """Not the top-k: the worst pairs are parents as often as the best, and the freeze and the
    untried-first rule do not apply (student moves from the first step)."""
    study, _ = make(strategy="random", top_k=1, freeze_student=100)
    add(study, BASE_MOVE, None, 0.5)
    for i in range(1, 5):
        add(study, "layer_prune", 0, 0.5 - 0.1 * i)
    add(study, "layer_prune", 0, None, state=TrialState.FAIL)
    parents, kinds = Counter(), Counter()
    for _ in range(1000):
        trial = ask_move(study)
        parents[trial.user_attrs[PARENT_ATTR]] += 1
        kinds[trial.user_attrs[KIND_ATTR]] += 1
        study.tell(trial, state=TrialState.FAIL)  # keep the completed set fixed
    assert set(parents) == {0, 1, 2, 3, 4}  # never the failed trial 5
    assert all(140 <= n <= 260 for n in parents.values()), parents  # 200 ± 5 sd each
    # moves uniform over the 7 feasible ones: 4 student, 3 teacher
    assert 500 <= kinds["student"] <= 640, kinds  # 571 ± 4.5 sd


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        HillClimbingSampler(VOCAB, feasible, strategy="annealing")


def test_pool_strategy_climbs_the_moves_its_feasible_callback_offers() -> None:
    """Under ``pool`` the sampler is algorithm 1 over the pool's mutations: ``pool.start`` from
    the root, then only moves the callback lists for that parent, parents from the top-k."""
    vocab = [BASE_MOVE, "pool.start", "pool.depth1+", "pool.width2-", *TEACHER_MOVES]

    def pool_feasible(parent: FrozenTrial) -> tuple[list[str], list[str]]:
        students = ["pool.start"] if parent.params[MOVE_PARAM] == BASE_MOVE else ["pool.depth1+"]
        return students, TEACHER_MOVES

    sampler = HillClimbingSampler(
        vocab, pool_feasible, strategy="pool", top_k=2, freeze_student=0, p_student=1.0, seed=3
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dist = {MOVE_PARAM: CategoricalDistribution(vocab)}
    study.add_trial(
        create_trial(value=0.1, params={MOVE_PARAM: BASE_MOVE}, distributions=dist, user_attrs={})
    )
    first = study.ask()
    assert first.suggest_categorical(MOVE_PARAM, vocab) == "pool.start"
    study.tell(first, 0.2)
    seen = []
    for _ in range(8):
        trial = study.ask()
        move = trial.suggest_categorical(MOVE_PARAM, vocab)
        seen.append((trial.user_attrs[PARENT_ATTR], move))
        study.tell(trial, state=TrialState.FAIL)
    assert set(seen) <= {(0, "pool.start"), (1, "pool.depth1+"), (0, "teacher:fpn=16")} | {
        (p, m) for p in (0, 1) for m in TEACHER_MOVES
    }
    assert (1, "pool.depth1+") in seen


def test_a_finetuned_pair_is_never_a_parent() -> None:
    """A fine-tuning trial had more training than a search step: even as the best it is skipped."""
    vocab = [*VOCAB, "finetune"]
    sampler = HillClimbingSampler(vocab, feasible, freeze_student=0, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dist = {MOVE_PARAM: CategoricalDistribution(vocab)}
    for move, parent, value in [
        (BASE_MOVE, None, 0.1),
        ("layer_prune", 0, 0.2),
        ("finetune", 1, 0.9),
    ]:
        study.add_trial(
            create_trial(
                value=value,
                params={MOVE_PARAM: move},
                distributions=dist,
                user_attrs={PARENT_ATTR: parent},
            )
        )
    parents = set()
    for _ in range(30):
        trial = study.ask()
        trial.suggest_categorical(MOVE_PARAM, vocab)
        parents.add(trial.user_attrs[PARENT_ATTR])
        study.tell(trial, state=TrialState.FAIL)
    assert parents == {0, 1}
