"""Mid-training resume: a run saved at iteration k and restored into fresh objects ends exactly
where the uninterrupted run ends — for one training (with a KD adapter), for a search trial whose
worker is killed (a second worker resumes it), and inside a pool phase."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from jdsearch.core.errors import CheckpointError
from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.data.synth import generate
from jdsearch.engine.train import StateHook, train
from jdsearch.methods.distill import make_distiller
from jdsearch.models.detector import Detector, build_detector
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import TrainConfig
from jdsearch.store.trainstate import (
    TrainState,
    flatten,
    trainstate_from_bytes,
    trainstate_to_bytes,
    unflatten,
)

RES = (Resolution(64, 48), Resolution(80, 64))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    info = generate(tmp_path_factory.mktemp("synth"), images=10, seed=2, size=(40, 72))
    return CocoDataset(info.train_json, info.image_dir)


def _detector(num_classes: int, seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    return build_detector(load_spec("tiny-r18-fpn"), num_classes)


def _teacher(num_classes: int) -> Detector:
    torch.manual_seed(7)
    return build_detector(load_spec("tiny-r50-fpn"), num_classes)  # another FPN width: an adapter


def _config(**kw: Any) -> TrainConfig:
    # 8 images, batch 3: passes of 3 batches, so the runs cross epochs and resume mid-pass.
    base: dict[str, Any] = dict(
        max_iters=7, batch_size=3, lr=0.02, warmup_iters=3, resolutions=RES, seed=5
    )
    base.update(kw)
    return TrainConfig(**base)


def _pair(data: CocoDataset) -> tuple[Detector, nn.Module]:
    student = _detector(data.num_classes)
    distiller = make_distiller(student, _teacher(data.num_classes), seed=3)
    return student, distiller


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


# ------------------------------------------------------------------------ the format
def test_state_round_trips_without_pickle_and_refuses_damage() -> None:
    sd = {"state": {0: {"momentum_buffer": torch.arange(4.0)}, 3: {"step": torch.tensor(2.0)}}}
    sd["param_groups"] = [{"lr": 0.1, "params": [0, 3], "nesterov": False, "foreach": None}]
    tensors: dict[str, torch.Tensor] = {"w": torch.ones(2, 2)}
    meta = {"optim": flatten(sd, "optim", tensors), "note": "x"}
    data = trainstate_to_bytes(TrainState(5, tensors, meta))
    back = trainstate_from_bytes(data, "s")
    assert back.iteration == 5 and back.meta["note"] == "x"
    again = unflatten(back.meta["optim"], back.tensors)
    assert set(again["state"]) == {0, 3}  # integer keys survive JSON
    assert torch.equal(again["state"][0]["momentum_buffer"], torch.arange(4.0))
    assert again["param_groups"][0]["params"] == [0, 3]
    damaged = bytearray(data)
    damaged[-3] ^= 0xFF
    with pytest.raises(CheckpointError, match="sha256"):
        trainstate_from_bytes(bytes(damaged), "s")
    with pytest.raises(CheckpointError, match="not a training state"):
        trainstate_from_bytes(b"\x00" * 12, "s")


# ------------------------------------------------------------------------ one training
def test_resumed_training_with_kd_equals_the_uninterrupted_run(data: CocoDataset) -> None:
    """Train 7 iterations; train 4, save, restore into a fresh student, distiller and
    optimizer (through bytes), train to 7: the same weights, adapter and losses, bit for bit."""
    config = _config()
    student, distiller = _pair(data)
    saved: list[TrainState] = []
    whole = train(
        student,
        data,
        config,
        loss_terms=[distiller],
        state_hook=StateHook(every=4, save=saved.append),
    )
    assert [s.iteration for s in saved] == [4]  # every 4, never after the last
    assert whole.iterations == 7

    blob = trainstate_to_bytes(saved[0])
    student2, distiller2 = _pair(data)
    rest = train(
        student2,
        data,
        config,
        loss_terms=[distiller2],
        resume=trainstate_from_bytes(blob, "state"),
    )
    _assert_equal(_state(student), _state(student2))
    _assert_equal(_state(distiller.adapter), _state(distiller2.adapter))
    assert rest.loss_history == whole.loss_history and rest.images == whole.images


def test_a_state_of_another_run_is_refused(data: CocoDataset) -> None:
    saved: list[TrainState] = []
    train(
        _detector(data.num_classes),
        data,
        _config(max_iters=2),
        state_hook=StateHook(1, saved.append),
    )
    with pytest.raises(CheckpointError, match="seed"):
        train(_detector(data.num_classes), data, _config(max_iters=2, seed=6), resume=saved[0])


def _host_rngs() -> tuple[Any, Any]:
    """Python's and NumPy's global generator states, comparable with ``==``."""
    _, keys, *rest = np.random.get_state()
    return random.getstate(), (keys.tolist(), *rest)


class _SeesHostRngs(nn.Module):
    """A loss term that records the global Python and NumPy states at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, Any]] = []

    def forward(self, model: nn.Module) -> dict[str, torch.Tensor]:
        self.seen.append(_host_rngs())
        return {}


def test_a_resume_sets_the_global_rngs_inside_training_and_restores_them_after(
    data: CocoDataset,
) -> None:
    """A resumed run steps with the Python and NumPy states the interrupted run saved, and
    leaves the caller's as they were: the resume sets them inside the trainer's fork."""
    config = _config(max_iters=2)
    saved: list[TrainState] = []
    random.seed(11)
    np.random.seed(12)
    at_save = _host_rngs()
    train(_detector(data.num_classes), data, config, state_hook=StateHook(1, saved.append))
    assert _host_rngs() == at_save
    random.seed(21)  # the caller's generators, elsewhere now
    np.random.seed(22)
    before = _host_rngs()
    assert before != at_save
    seer = _SeesHostRngs()
    train(_detector(data.num_classes), data, config, loss_terms=[seer], resume=saved[0])
    assert seer.seen == [at_save]  # the one step after the resume ran with the saved states
    assert _host_rngs() == before


# ------------------------------------------------------------------------ a pool phase
class _Killed(Exception):
    """Stands for the process dying right after a save."""


def test_a_pool_phase_interrupted_and_resumed_inside_equals_the_uninterrupted_phase(
    data: CocoDataset, tmp_path: Path
) -> None:
    """A shrinking phase (sub-network sampling, re-ordered channels, KD through an elastic
    adapter) stopped right after its state is saved at iteration 2 of 5, then continued by a new
    run from the pool as the phase began: the same weights, sub-networks and losses as a phase
    that ran through. The state file is removed when the phase is done."""
    from jdsearch.methods.pool import ElasticPool, pool_from_bytes, pool_to_bytes
    from jdsearch.methods.pool.training import PhaseStates, resume_pool, train_pool
    from jdsearch.spec.pool import PoolSpec

    from .test_pool import SMALL_POOL

    spec = PoolSpec.from_dict(SMALL_POOL)
    torch.manual_seed(0)
    start = pool_to_bytes(ElasticPool(spec, data.num_classes, class_names=data.class_names))

    class KillAfterSave(PhaseStates):
        def save(self, phase: int, state: TrainState, schedule: dict[str, Any]) -> None:
            super().save(phase, state, schedule)
            raise _Killed

    whole = pool_from_bytes(start)
    (expected,) = train_pool(whole, data, phases=[1], max_iters=5)

    path = tmp_path / "pool.phase-state.safetensors"
    with pytest.raises(_Killed):
        resume_pool(
            pool_from_bytes(start), data, KillAfterSave(path, every=2), phases=[1], max_iters=5
        )
    saved = PhaseStates(path, every=2).load(1)
    assert saved is not None and saved.iteration == 2
    assert PhaseStates(path, every=2).load(2) is None  # another phase's state is not used

    resumed = pool_from_bytes(start)
    (record,) = resume_pool(resumed, data, PhaseStates(path, every=2), phases=[1], max_iters=5)
    _assert_equal(_state(whole.supernet), _state(resumed.supernet))
    assert record.subnets_sampled == expected.subnets_sampled
    assert record.final_losses == expected.final_losses
    assert record.loss_history == expected.loss_history
    assert not path.exists()


# ------------------------------------------------------------------------ a killed worker
@pytest.mark.slow
def test_a_killed_trial_is_resumed_by_its_retry_at_the_saved_iteration(
    search_assets: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker saves its trial's state every 2 iterations and is SIGKILLed after a save; a
    second worker retries the trial, resumes at the saved iteration (not 0), completes it with
    the H an uninterrupted run of the trial gets, and removes the state artifact."""
    from jdsearch.search.objective import Objective
    from jdsearch.search.record import MOVE_PARAM, PARENT_ATTR, STATE_SYSATTR, WORKER_SYSATTR
    from jdsearch.search.resume import RESUMED_ATTR
    from jdsearch.search.session import prepare
    from jdsearch.spec.study import load_study

    from .test_workers import WORKER_TIMEOUT_S, fresh_trials, wait_for, workers, write_spec

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    hb = 2
    spec_file, _ = write_spec(
        tmp_path, search_assets, "resumed", url, heartbeat_s=hb, trial_checkpoint_every=2
    )
    doc = yaml.safe_load(spec_file.read_text())
    doc["fast_eval"]["epochs"] = 2  # 12 iterations: the kill lands between a save and the end
    spec_file.write_text(yaml.safe_dump(doc))
    spec = load_study(spec_file)
    study, ctx = prepare(spec, progress=False)  # base + pool into the storage; no trial yet
    command = ["search", str(spec_file), "--storage", url, "--quiet", "--n-trials", "1"]

    def saved() -> FrozenTrial | None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            state = t.system_attrs.get(STATE_SYSATTR)
            if isinstance(state, dict) and state.get("artifact"):
                return t
        return None

    with workers(tmp_path) as spawn:
        first = spawn("first", command)
        wait_for("the first trial to save a state", saved, WORKER_TIMEOUT_S, alive=first)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        victim = saved()
        assert victim is not None, "the trial finished between the poll and the kill"
        state = victim.system_attrs[STATE_SYSATTR]
        assert 0 < state["iteration"] < 12 and ctx.store.exists(state["artifact"])
        wait_for("the killed trial's heartbeat to go stale", lambda: _stale(url, hb, spec.name), 20)
        second = spawn("second", command)
        second.finish()

    trials = {t.number: t for t in fresh_trials(spec, url)}
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = (t for t in trials.values() if t.number != victim.number)
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == victim.number
    assert retry.state == TrialState.COMPLETE
    assert retry.system_attrs[WORKER_SYSATTR] == second.marker
    assert retry.user_attrs[RESUMED_ATTR] == state["iteration"]  # not 0
    # Its states are gone: the killed attempt's and its own.
    assert retry.system_attrs[STATE_SYSATTR] == {"artifact": None}
    assert not ctx.store.exists(state["artifact"])
    assert not [i for i in ctx.store.list_ids() if i.startswith("trainstate-")]
    # The resumed trial ends where an uninterrupted run of the same trial (its seed) ends.
    objective = Objective(ctx)
    move, parent = retry.params[MOVE_PARAM], retry.user_attrs[PARENT_ATTR]
    pair = objective.load_pair(study, victim.number, move, parent)
    objective.train_pair(pair, objective.seed_of(victim.number))
    assert objective.score(victim.number, pair.student).value == retry.value


def _stale(url: str, hb: int, name: str) -> bool:
    from optuna.storages import RDBStorage

    probe = RDBStorage(url, heartbeat_interval=hb, grace_period=2 * hb)
    try:
        sid = probe.get_study_id_from_name(name)
        return bool(probe._get_stale_trial_ids(sid))
    finally:
        probe.remove_session()
        probe.engine.dispose()
