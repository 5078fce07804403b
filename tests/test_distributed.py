"""Data-parallel training (``torchrun``): 2 CPU processes over gloo equal one process.

One training step of 2 ranks, each on one image, must give the weights and batch-norm statistics
of one process that trains on both images in one batch. The detector is set so that both ways
sample the same anchors and proposals and weigh them alike (every labelled anchor and every
proposal is sampled, and both images hold the same boxes): then the mean of the two ranks' losses
is the loss of the concatenated batch, and what remains to differ is what data parallelism must
get right — the gradient average, and batch norm over the global batch.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from jdsearch.core.errors import RanksOutOfStep
from jdsearch.engine import distributed
from jdsearch.engine.train import train
from jdsearch.models.detector import build_detector
from jdsearch.spec.detector import load_spec
from jdsearch.spec.settings import TrainConfig

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _images() -> list[tuple[Tensor, dict[str, Any]]]:
    """Two 64×64 images with different pixels and the same two boxes."""
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[8.0, 10.0, 30.0, 40.0], [34.0, 20.0, 60.0, 50.0]])
    out = []
    for i in range(2):
        image = torch.rand(3, 64, 64, generator=g)
        image[:, 10:40, 8:30] += 0.5 * (i + 1)
        target = {"boxes": boxes.clone(), "labels": torch.tensor([1, 2]), "image_id": i}
        out.append((image.clamp(0, 1), target))
    return out


class _Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.items = _images()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        return self.items[i]


def _detector() -> nn.Module:
    torch.manual_seed(0)
    detector = build_detector(load_spec("tiny-r18-fpn"), 3)
    detector.transform.min_size, detector.transform.max_size = (64,), 64
    # Sample every labelled anchor and every proposal, keep 8 proposals per image.
    detector.rpn.fg_bg_sampler.batch_size_per_image = 10**6
    detector.rpn._post_nms_top_n = {"training": 8, "testing": 8}
    detector.roi_heads.fg_bg_sampler.batch_size_per_image = 10**6
    return detector


def _config(batch_size: int) -> TrainConfig:
    return TrainConfig(max_iters=1, batch_size=batch_size, lr=0.02, warmup_iters=0, hflip=0.0)


def _one_step(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        detector = _detector()
        train(detector, _Images(), _config(batch_size=1))
        if rank == 0:
            state = {k: v.contiguous() for k, v in detector.state_dict().items()}
            save_file(state, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_step_equals_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    out = tmp_path / "ranks.safetensors"
    mp.spawn(_one_step, args=(2, free_port(), str(out)), nprocs=2, join=True)
    parallel = load_file(out)

    torch.set_num_threads(1)
    start = _detector().state_dict()
    single = _detector()
    train(single, _Images(), _config(batch_size=2))
    reference = single.state_dict()

    assert parallel.keys() == reference.keys()
    moved = [k for k in reference if not torch.equal(reference[k], start[k])]
    bn_stats = [k for k in moved if k.endswith(("running_mean", "running_var"))]
    assert len(moved) > 50 and len(bn_stats) > 10  # the step changed weights and BN statistics
    worst = max(
        moved, key=lambda k: float((parallel[k].float() - reference[k].float()).abs().max())
    )
    diff = float((parallel[worst].float() - reference[worst].float()).abs().max())
    print(f"largest difference: {worst} {diff:.2e}")
    assert diff <= 1e-5, f"{worst}: {diff}"
    # Without synchronized BN the statistics would be each rank's own image's: far apart.
    assert any(float((parallel[k] - start[k]).abs().max()) > 1e-3 for k in bn_stats), (
        "the BN statistics did not move"
    )


def test_one_process_is_untouched() -> None:
    """Without a process group nothing is distributed and batch norm is torch's own."""
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1 and distributed.is_main()
    with distributed.synchronized_batch_norm():
        assert torch.nn.functional.batch_norm is distributed._PLAIN_BATCH_NORM
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.agree(False) is False


def _lineage(url: str, name: str) -> list[tuple[int, str, Any, str]]:
    import optuna

    from jdsearch.search.record import MOVE_PARAM, TrialRecord

    study = optuna.load_study(study_name=name, storage=url)
    out = []
    for t in study.get_trials(deepcopy=False):
        assert t.state == optuna.trial.TrialState.COMPLETE, (t.number, t.state, t.user_attrs)
        record = TrialRecord.from_trial(t)
        out.append((t.number, t.params[MOVE_PARAM], record.parent, record.teacher))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("when", ["always", "stronger"])
def test_a_search_under_two_ranks_has_the_lineage_of_one_process(tmp_path: Path, when: str) -> None:
    """``torchrun --nproc-per-node 2 -m jdsearch search``: the base, the pool's phases and 3
    trials trained by 2 gloo ranks; the same trials, moves, parents and teachers as one process.
    With ``kd.when: stronger`` rank 0's teacher check decides for every rank: the ranks build the
    same losses (else DDP fails) and the trials follow the recorded check. (Not compared with one
    process there: a pool and a base trained for seconds score near 0 AP, and one process's
    weights differ from two ranks' in the last bits, enough to flip such a near tie.)"""
    import subprocess
    import sys

    import yaml

    from .conftest import tiny_study_dict

    runs = {}
    for how in ("ranks", "single") if when == "always" else ("ranks",):
        work = tmp_path / how
        work.mkdir()
        spec = tiny_study_dict(tmp_path / "data", "ddp")
        url = f"sqlite:///{work / 'study.db'}"
        spec["search"].update({"n_trials": 3, "storage": url})
        spec["kd"]["when"] = when
        (work / "ddp.yaml").write_text(yaml.safe_dump(spec))
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        prefix = [sys.executable, *(torchrun if how == "ranks" else [])]
        command = [*prefix, "-m", "jdsearch", "search", "ddp.yaml", "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[how] = (done.stdout, _lineage(url, "ddp"))
    out, lineage = runs["ranks"]
    assert out.count("lineage") == 1, out  # rank 0 alone prints the summary
    assert "training the base detector" in out and "training the elastic teacher pool" in out
    assert ("teacher check" in out) == (when == "stronger")
    if when == "always":
        assert len(lineage) == 3 and lineage == runs["single"][1]
        return
    import optuna

    from jdsearch.search.teacher_check import TEACHER_CHECK_ATTR, TeacherCheck

    study = optuna.load_study(
        study_name="ddp", storage=f"sqlite:///{tmp_path / 'ranks' / 'study.db'}"
    )
    check = TeacherCheck.from_dict(study.user_attrs[TEACHER_CHECK_ATTR], "test")
    assert len(lineage) == 3 and all(bool(teacher) == check.stronger for *_, teacher in lineage)


def _step_states(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = []
    try:
        # Every rank raises at the same agreed point: still in step.
        try:
            with distributed.lockstep("agreed"):
                if not distributed.agree(rank == 0):
                    distributed.settle()
                    raise ValueError("shared")
        except ValueError:
            seen.append(distributed.out_of_step())
        # Rank 1 alone fails inside a section: out of step, and check_in_step says so.
        try:
            with distributed.lockstep("trial 7"):
                if rank == 1:
                    raise KeyError("alone")
        except KeyError as e:
            try:
                distributed.check_in_step(e)
            except RanksOutOfStep as stop:
                seen.append(str(stop))
        seen.append(distributed.out_of_step())
        Path(f"{out}.{rank}").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_a_rank_failing_alone_leaves_the_ranks_out_of_step(tmp_path: Path) -> None:
    out = str(tmp_path / "seen")
    mp.spawn(_step_states, args=(2, free_port(), out), nprocs=2, join=True)
    assert json.loads(Path(f"{out}.0").read_text()) == ["", ""]
    seen = json.loads(Path(f"{out}.1").read_text())
    assert seen[0] == "" and seen[2] == "trial 7"
    assert seen[1].startswith("rank 1 failed alone in trial 7 (KeyError")
