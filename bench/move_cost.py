"""What each student move costs a converged parent, and which lever wins it back (issue 27, 2).

Issue 11's per-move table, measured on purpose instead of read off a search's trials: from the
study's base detector (``base.checkpoint``; the quickstart ships one trained to convergence), each
move in ``--moves`` is applied with the study's morph settings (``search.channel_fraction``) and
the child gets the study's fast evaluation (``fast_eval``, its BN sparsity, its resolutions), as a
search trial from that parent would. The ``none`` row is the parent itself given the same fast
evaluation: what a trial costs without any move (the restart of warm-up and schedule), and, over
seeds, the noise floor.

Each lever in ``--levers`` changes how the child is trained, all else equal:

    default     the study's fast evaluation as it is
    low_lr      the same length at lr 0.002 without warm-up: continue the parent's (annealed)
                schedule rather than restart it from the top
    kd_parent   the study's fast evaluation, distilled from the parent (the detector before the
                move) with the study's KD weights
    kd_parent_w1    the same with every KD weight 1 (the paper's)
    kd_parent_low_lr    kd_parent at low_lr's schedule
    taylor      the study's fast evaluation; channel_prune ranks channels by their Taylor
                importance (jdsearch.methods.morph.importance) instead of their BN scale |γ|
    taylor_low_lr   taylor at low_lr's schedule
    taylor_flops_low_lr     taylor_low_lr, each channel's importance divided by the multiply-adds
                its removal saves (search.channel_importance: taylor_flops)
    taylor_kd_parent_low_lr     all three
    taylor_kd_parent_w1     taylor, distilled from the parent with every KD weight 1
    taylor_recover  taylor, and before the fast evaluation a local recovery
                (jdsearch.methods.morph.recovery): the child's changed stages and its FPN
                regress the parent's FPN outputs for 50 steps, every other weight frozen
    taylor_recover200   the same for 200 steps
    taylor_recover200_only  the 200 steps instead of the fast evaluation, for a move that
                changes a stage (the others, and ``none``, get the fast evaluation)
    taylor_recover100_only  the same with 100 steps: 400 images at batch 4, fewer than the
                fast evaluation's 450 (search.recovery_iters: 100, after_recovery: score)

For each (lever, move) it prints, as mean ± sd over ``--seeds`` training seeds, the AP of the
child on the selection split right after the move (no training) and after the fast evaluation, at
the resolution where the parent's H is best, the change from the parent's AP there and from the
mean AP of the same lever's ``none`` row (the parent given the same training: the move's own
cost, as a search trial sees it from a parent that had a fast evaluation too), the FLOPs
ratio at the base resolution, and H×: the child's best H over the parent's (H is the study's
score, AP × cost^−α at the resolution where it is best). The issue's target: ``channel_prune`` no
worse than −1.0 AP per step and ``rearrange`` no worse than −1.5.

    OMP_NUM_THREADS=1 python bench/move_cost.py                      # the quickstart, ~25 min
    OMP_NUM_THREADS=1 python bench/move_cost.py --levers default low_lr --seeds 1 --moves none channel_prune
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jdsearch.core.resolution import Resolution
from jdsearch.data.coco import CocoDataset
from jdsearch.engine.evaluate import evaluate
from jdsearch.engine.train import train
from jdsearch.methods.distill import make_distiller
from jdsearch.methods.morph.actions import (
    MorphConfig,
    MorphError,
    channel_costs,
    evolve_with_report,
)
from jdsearch.methods.morph.importance import taylor_scores
from jdsearch.methods.morph.pruning import BNSparsity
from jdsearch.methods.morph.recovery import changed_stages, local_recovery
from jdsearch.models.detector import Detector
from jdsearch.models.flops import count_flops
from jdsearch.models.heads import stop_recording
from jdsearch.search.assets import ensure_data
from jdsearch.search.objective import score_h
from jdsearch.spec.settings import KDConfig, TrainConfig
from jdsearch.spec.study import StudySpec, load_study, study_from_dict
from jdsearch.store.checkpoint import load_checkpoint

DEFAULT_MOVES = (
    "none",
    "channel_prune",
    "layer_prune",
    "add_layer:3",
    "rearrange:3->4",
    "rearrange:4->3",
)


@dataclasses.dataclass(frozen=True)
class Lever:
    """How a child is trained: the fast evaluation's lr and warm-up, and its teacher."""

    lr: float | None = None  # None: the study's
    warmup_iters: int | None = None
    kd_parent: bool = False
    kd_weight: float | None = None  # every KD weight; None: the study's
    importance: str = "bn_scale"  # what channel_prune ranks channels by: bn_scale or taylor
    recover_iters: int = 0  # local recovery steps before the fast evaluation (0: none)
    recover_only: bool = False  # a recovered child skips the fast evaluation


LEVERS: dict[str, Lever] = {
    "default": Lever(),
    "low_lr": Lever(lr=0.002, warmup_iters=0),
    "kd_parent": Lever(kd_parent=True),
    "kd_parent_w1": Lever(kd_parent=True, kd_weight=1.0),
    "kd_parent_low_lr": Lever(lr=0.002, warmup_iters=0, kd_parent=True),
    "taylor": Lever(importance="taylor"),
    "taylor_low_lr": Lever(lr=0.002, warmup_iters=0, importance="taylor"),
    "taylor_flops_low_lr": Lever(lr=0.002, warmup_iters=0, importance="taylor_flops"),
    "taylor_kd_parent_low_lr": Lever(lr=0.002, warmup_iters=0, kd_parent=True, importance="taylor"),
    "taylor_kd_parent_w1": Lever(kd_parent=True, kd_weight=1.0, importance="taylor"),
    "taylor_recover": Lever(importance="taylor", recover_iters=50),
    "taylor_recover200": Lever(importance="taylor", recover_iters=200),
    "taylor_recover200_only": Lever(importance="taylor", recover_iters=200, recover_only=True),
    "taylor_recover100_only": Lever(importance="taylor", recover_iters=100, recover_only=True),
}


@dataclasses.dataclass
class Scored:
    ap: dict[str, float]  # AP by resolution, in points
    h: dict[str, float]  # H by resolution
    flops: int  # at the base resolution

    @property
    def best(self) -> str:
        return max(self.h, key=lambda k: self.h[k])


class Bench:
    def __init__(
        self, spec: StudySpec, base: Detector, train_set: CocoDataset, val_set: CocoDataset
    ):
        self.spec, self.base = spec, base
        self.train_set, self.val_set = train_set, val_set
        self.base_res = spec.base.resolution or base.spec.input.size
        self.base_flops = count_flops(base, size=self.base_res.hw).total
        self.morph = MorphConfig(channel_fraction=spec.search.channel_fraction)
        self._taylor: dict[str, tuple[float, ...]] | None = None

    def score(self, det: Detector) -> Scored:
        metrics = evaluate(det, self.val_set, self.spec.resolutions, device=self.spec.device)
        s = self.spec.score
        flops = count_flops(det, size=self.base_res.hw).total
        ap, h = {}, {}
        for key, m in metrics.items():
            res = Resolution.parse(key)
            value = float(getattr(m, s.metric))
            c = count_flops(det, size=res.hw).total
            ap[key] = 100 * value
            h[key] = score_h(value, c, self.base_flops, res, self.base_res, s.alpha, s.beta)
        return Scored(ap, h, flops)

    def child(self, move: str, importance: str) -> Detector:
        parent = copy.deepcopy(self.base)
        if move == "none":
            return parent
        config = self.morph
        if importance.startswith("taylor") and move == "channel_prune":
            if self._taylor is None:
                spec = self.spec
                self._taylor = taylor_scores(
                    parent,
                    self.train_set,
                    batch_size=spec.fast_eval.batch_size,
                    resolutions=spec.resolutions,
                )
            costs = channel_costs(parent) if importance == "taylor_flops" else None
            config = dataclasses.replace(config, channel_scores=self._taylor, channel_costs=costs)
        child, _ = evolve_with_report(parent, move, config=config)
        return child

    def fast_eval(self, student: Detector, lever: Lever, seed: int) -> None:
        spec = self.spec
        if lever.recover_iters and changed_stages(self.base, student):
            local_recovery(
                student,
                self.base,
                self.train_set,
                iters=lever.recover_iters,
                batch_size=spec.fast_eval.batch_size,
                resolutions=spec.resolutions,
                seed=seed,
            )
            if lever.recover_only:
                return
        config: TrainConfig = spec.train_config(spec.fast_eval, seed)
        if lever.lr is not None:
            config = dataclasses.replace(config, lr=lever.lr)
        if lever.warmup_iters is not None:
            config = dataclasses.replace(config, warmup_iters=lever.warmup_iters)
        terms: list[Any] = []
        if lever.kd_parent:
            kd: KDConfig = spec.kd
            if lever.kd_weight is not None:
                w = lever.kd_weight
                kd = dataclasses.replace(kd, feat_weight=w, cls_weight=w, loc_weight=w)
            terms.append(make_distiller(student, copy.deepcopy(self.base), kd, seed=seed))
        if spec.search.bn_sparsity > 0:
            terms.append(BNSparsity(spec.search.bn_sparsity))
        train(student, self.train_set, config, loss_terms=terms)
        stop_recording(student)


def _mean_sd(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run(
    spec: StudySpec, base_path: Path, args: argparse.Namespace, say: Callable[[str], None]
) -> None:
    train_set, val_set = ensure_data(spec)
    base = load_checkpoint(base_path).detector
    bench = Bench(spec, base, train_set, val_set)
    parent = bench.score(base)
    at = parent.best  # the parent's resolution: APs compare there
    say(
        f"# {spec.name}: parent {base_path.name} (AP {parent.ap[at]:.1f} at {at}, H "
        f"{parent.h[at]:.4f}); {len(train_set)} train / {len(val_set)} selection images; fast "
        f"evaluation {spec.fast_eval.epochs:g} epoch at lr {spec.fast_eval.lr:g}, warm-up "
        f"{spec.fast_eval.warmup_iters}; channel_fraction {spec.search.channel_fraction:g}; "
        f"seeds {args.seeds}"
    )
    header = (
        "| lever | move | FLOPs× | AP after the move | AP after training | ΔAP | ΔAP vs none "
        "| H× | best res |"
    )
    say("")
    say(header)
    say("|---|---|---|---|---|---|---|---|---|")
    moved: dict[tuple[str, str], Scored] = {}
    # A row whose child and training another lever already ran (taylor's none, layer_prune…)
    done: dict[tuple[str, str, Lever], list[Scored]] = {}
    started = time.perf_counter()
    for lever_name in args.levers:
        lever = LEVERS[lever_name]
        for move in args.moves:
            cut = (move, lever.importance if move == "channel_prune" else "")
            try:
                if cut not in moved:
                    moved[cut] = bench.score(bench.child(move, lever.importance))
            except MorphError as e:  # a move the parent cannot take: say so and go on
                say(f"| {lever_name} | {move} | {type(e).__name__}: {e} | | | | | | |")
                continue
            key = (*cut, dataclasses.replace(lever, importance=""))
            if key not in done:
                done[key] = []
                for seed in range(args.seeds):
                    child = bench.child(move, lever.importance)
                    bench.fast_eval(child, lever, seed=1000 + seed)
                    done[key].append(bench.score(child))
            trained = done[key]
            aps = [t.ap[at] for t in trained]
            none = done.get(("none", "", key[2]))
            vs_none = (
                ""
                if none is None
                else _mean_sd([a - statistics.mean(t.ap[at] for t in none) for a in aps])
            )
            say(
                f"| {lever_name} | {move} | {moved[cut].flops / parent.flops:.3f} "
                f"| {moved[cut].ap[at]:.1f} | {_mean_sd(aps)} "
                f"| {_mean_sd([a - parent.ap[at] for a in aps])} | {vs_none} "
                f"| {_mean_sd([t.h[t.best] / parent.h[at] for t in trained], 3)} "
                f"| {', '.join(sorted({t.best for t in trained}))} |"
            )
    say("")
    say(
        f"# {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} thread(s); ΔAP "
        f"and the APs at {at}; H× against the parent's H {parent.h[at]:.4f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="quickstart", help="study spec YAML or preset name")
    p.add_argument(
        "--base", type=Path, default=None, help="parent checkpoint (default: the study's base)"
    )
    p.add_argument("--moves", nargs="+", default=list(DEFAULT_MOVES))
    p.add_argument("--levers", nargs="+", choices=list(LEVERS), default=list(LEVERS))
    p.add_argument("--seeds", type=int, default=2, help="training seeds per (lever, move)")
    p.add_argument(
        "--fraction", type=float, default=None, help="channel_fraction (default: the study's)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--root", type=Path, default=None, help="data folder's parent (default: temporary)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    spec = load_study(args.study)
    base = args.base or spec.base_checkpoint
    if base is None:
        raise SystemExit(f"{spec.source}: base.checkpoint is not set; pass --base")

    def go(root: Path) -> None:
        data = spec.to_dict()
        data["data"]["dir"] = str(root / "data")
        if args.fraction is not None:
            data["search"]["channel_fraction"] = args.fraction
        run(
            study_from_dict(data, source=spec.source),
            Path(base),
            args,
            lambda s: print(s, flush=True),
        )

    if args.root is not None:
        go(args.root)
    else:
        with tempfile.TemporaryDirectory(prefix="move_cost_") as tmp:
            go(Path(tmp))


if __name__ == "__main__":
    main()
