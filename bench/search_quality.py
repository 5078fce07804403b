"""Does the search pay? Joint-DetNAS against simpler ways of spending the same compute
(paper tables 5, 9, 10 and fig. 4), judged on images the search never saw.

From one shared base checkpoint and one shared teacher pool (the study's own, trained once), for
each of ``--seeds`` seeds (``search.seed``), each row below trains for a budget in epochs of the
training set. A search gets ``--trials`` trials of the study's fast evaluation
(``fast_eval.epochs`` each): the search budget, ``trials × fast_eval.epochs`` epochs. The
``finetuned`` row is the hill-climbing search followed by ``jdsearch finetune`` of its winner for
``--finetune-epochs`` (default half the search budget, the paper's appendix D fine-tunes a
searched pair for a fraction of what the search spent; 0.5 × is that fraction at the bench's
scale): the search budget plus the fine-tune budget. Every control but the two lineage ones
(``longer``, ``longer_kd``) gets that same total, search budget + fine-tune budget, so that
``finetuned`` is compared with each at equal compute; the searches themselves stay at the search
budget (their winners are not fine-tuned). The table's "train imgs" is what each row actually
trained on (a search's trials and the fine-tune included): equal, up to the rounding of each
training to whole batches, for ``finetuned`` and every control but the lineage ones.

    hill_climb      the default search (algorithm 1, dynamic KD)
    pareto          hill climbing in a Pareto study (score.mode: pareto): parents from the
                    non-dominated set of (AP, cost), no single α
    random          a random walk with inheritance
    greedy          hill climbing from the best pair only
    pool            ETP search: students cut from the teacher pool (appendix F)
    kd_always       hill climbing with dynamic KD whatever the teacher pool is worth
                    (``kd.when: always``; the default distils only from a pool whose largest
                    sub-network beats the base, ``jdsearch.search.teacher_check``)
    kd_fixed        hill climbing, the super-net as the only teacher (fig. 4's conventional KD,
                    ``kd.when: always``)
    kd_off          hill climbing without a teacher (NAS + pruning)
    finetuned       the hill_climb row's winner fine-tuned (``jdsearch.search.finetune``: a child
                    trial trained with the winner's teacher at the fast evaluation's settings) in
                    a copy of that row's study, so that the hill_climb row's front and the noise
                    floor are the search's own
    pipelining      table 5: BN-sparsity training of the base (half the budget), channel and
                    layer pruning down to the hill-climbing winner's FLOPs, then distillation
                    from the super-net (the other half; plain training when the study's teacher
                    check refuses the pool, as the default search does)
    longer          the base trained on with no search and no teacher, for as many epochs as
                    the hill-climbing winner's lineage had (root included)
    longer_kd       the same, distilled from the super-net
    longer_all      the base trained on for the whole budget (search + fine-tune), no teacher
    longer_all_kd   the same, distilled from the super-net
    torch_pruning   the peer a user would reach for instead of a search: Torch-Pruning (the
                    ``bench`` extra) prunes the base down to the hill_climb winner's FLOPs (BN-scale
                    importance, global ranking), then the pruned detector trains for the whole
                    budget (search + fine-tune) with no teacher, as longer_all does
    torch_pruning_l1    the same with L1-magnitude importance (``MagnitudeImportance(p=1)``)
    torch_pruning_kd    torch_pruning's pruning, then trained distilled from the unpruned base
    torch_pruning_taylor    the same with Torch-Pruning's first-order Taylor importance
                    (``GroupTaylorImportance``; the gradients of 4 training batches at the base
                    resolution before each step), the criterion the quickstart's
                    ``channel_prune`` uses (``search.channel_importance: taylor``)
    torch_pruning_front BN-scale Torch-Pruning to 0.5×, 0.7× and 0.85× the base's FLOPs, each
                    detector trained for the whole budget (so three budgets in all, which its
                    "train imgs" shows): the table gives its best detector by selection H, and its
                    HV is the three's, beside the searches' fronts

What Torch-Pruning (1.6.1) prunes: its DepGraph pruner (``tp.pruner.BasePruner``, global
ranking over every group, ``pruning_ratio`` stepped by Torch-Pruning's own iterative schedule from
0 to 90 % of the channels in 90 steps, ``max_pruning_ratio`` 0.9: a layer below 10 % of its width
is pruned no further, though the step that takes it there may leave it one channel) runs on
``detector.backbone`` (the ResNet body and the FPN), traced from one image at the base resolution.
It may prune every conv of the body: the stem, the inner convs of each block and each residual
stream as one group (the convs that end the stream's blocks, its projection shortcut, the next
blocks' inputs and the FPN lateral conv that reads it, all by the same channels, so a stream keeps
one width). It is kept off the FPN, whose width the RPN and RoI heads read, and off the shortcut
conv of every stride-1 projection block (a ResNet-50's first block, 64 → 256 channels): jdsearch's
:class:`~jdsearch.spec.arch.BackboneArch` describes a block by its conv widths and derives a
projection from a change of width or a stride, so a stride-1 stream pruned to the width of its
input would keep a shortcut that no architecture describes. What the pruning leaves is therefore
always an architecture: the detector is rebuilt from its modules' widths (each block's convs, the
stem's; strides, groups and the FPN as they were) and the pruned weights loaded into it exactly
(:func:`described`), a jdsearch detector that FLOPs counting, ``arch_key``, latency and checkpoints
take as any other. After each step jdsearch's ``count_flops`` at the base resolution counts the
detector; the pruning stops at the first step at or below the target, so it lands under the target
by less than one step's worth (:data:`TP_STEP_TOLERANCE` of the base's FLOPs). A target below what
pruning the body can reach (the FPN, RPN and RoI heads stay: about half of the tiny R18-FPN's
FLOPs at 208×128) keeps the last step, and the table says so under it.

The Torch-Pruning rows train at the fast evaluation's schedule unless ``--tp-lr`` and
``--tp-warmup`` give them their own: a converged base's search children continue its annealed
schedule at a low lr, which cannot recover what a library's pruning of a whole budget's worth of
channels destroys, so the fair peer is Torch-Pruning at the lr that suits it, chosen on the
selection split (one ``--out`` per lr, seed 0; the table says which lr its rows used).

``--alphas A ...`` adds one hill-climbing row per α, ``hill_climb_aA`` (the study's H with α = A),
so a Pareto search is compared with single-H searches at several trade-offs at the same budget.

A search row's winner is its best trial by H on the selection split (``data.max_val_images``);
a control's detector is scored the same way (H at every resolution, the best one kept). Every
winner is then judged on the held-out split (``data.test``, else the val images beyond
``max_val_images``), at the resolution where it scored best. FPS is batch 1 on the CPU, each
winner timed interleaved with the base detector, and given as a ratio to it.

Each (row, seed) writes ``results/ROW-sSEED.json`` under ``--out``; a run that finds it skips it,
so an interrupted bench resumes, and several processes with disjoint ``--seed-list`` or ``--rows``
can share the work (then ``--table-only`` prints the table of everything there). The table gives
mean ± sd over seeds, the training images and wall time each row actually used, and the noise
floor (the seed-0 hill-climbing winner re-run with three other seeds) and the hypervolume (HV)
of each row's held-out front relative to the base point: the search's non-dominated trials by
(selection AP, cost) where they scored best, each judged on the held-out split, and the area
(AP points × cost, cost being the score's (C/C_base)·(R/R_base)^β) they dominate that is better
than the base detector in both AP (held-out, at the base resolution) and cost (1); a control's
front is its one detector. ``search_quality.html``
has best-so-far H against trials for every search row and the held-out AP–FLOPs points of every
winner.

    python bench/search_quality.py --study studies/quickstart.yaml --seeds 3
    python bench/search_quality.py --study studies/quickstart.yaml --seeds 3 \
        --rows hill_climb pareto --alphas 0.1 1.0   # Pareto against H at α 0.1, 0.4 (the
                                                    # study's), 1.0: same trials, same seeds

The verdict's subset, ``--seeds 1 --threads 1 --tp-lr 0.04 --tp-warmup 10 --rows hill_climb
finetuned longer_all torch_pruning torch_pruning_kd random`` on the quickstart, took 18 min 29 s
on this project's 2-core machine (issue 26: under 30 minutes; ``/usr/bin/time``, 971 s of CPU),
the synthetic data, the noise floor's three re-runs and the table included, the shipped pool
used as it is, next to one or two other single-thread processes (a pool-training probe, a
helper's tests). Per row: hill_climb 94 s, random 105 s, finetuned 162 s (its fine-tune only),
longer_all 224 s, torch_pruning 217 s, torch_pruning_kd 288 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

SEARCH_ROWS = (
    "hill_climb", "pareto", "random", "greedy", "pool", "kd_always", "kd_fixed", "kd_off",
)  # fmt: skip
TP_ROWS = ("torch_pruning", "torch_pruning_l1", "torch_pruning_kd", "torch_pruning_taylor")
TP_FRONT_ROW = "torch_pruning_front"
CONTROL_ROWS = (
    "finetuned", "pipelining", "longer", "longer_kd", "longer_all", "longer_all_kd",
    *TP_ROWS, TP_FRONT_ROW,
)  # fmt: skip
ROWS = SEARCH_ROWS + CONTROL_ROWS
LINEAGE_ROWS = ("longer", "longer_kd")  # as many epochs as the hill-climbing winner's lineage had
# row -> (search.strategy, kd.mode, kd.when; None: the study's); score.mode pareto for "pareto".
# The rows about distillation itself distil whatever the teacher check would say.
_SEARCH_SETTINGS: dict[str, tuple[str, str, str | None]] = {
    "hill_climb": ("hill_climb", "dynamic", None),
    "pareto": ("hill_climb", "dynamic", None),
    "random": ("random", "dynamic", None),
    "greedy": ("greedy", "dynamic", None),
    "pool": ("pool", "dynamic", None),
    "kd_always": ("hill_climb", "dynamic", "always"),
    "kd_fixed": ("hill_climb", "fixed", "always"),
    "kd_off": ("hill_climb", "off", None),
}
PIPELINE_SPARSITY = 1e-4  # BN-sparsity weight of the pipelining baseline's first half
TP_IMPORTANCE = {
    "torch_pruning": "bn_scale",
    "torch_pruning_l1": "l1",
    "torch_pruning_kd": "bn_scale",
    "torch_pruning_taylor": "taylor",
}
TP_TAYLOR_BATCHES = 4  # training batches whose gradients each Taylor step ranks channels by
TP_FRONT = (0.5, 0.7, 0.85)  # the Torch-Pruning front: these fractions of the base's FLOPs
TP_MAX_RATIO = 0.9  # Torch-Pruning's schedule ends at 90 % of the channels; its max_pruning_ratio
TP_STEPS = 90  # ... in steps of 1 % of the channels
# One step removes at most this much of the base's FLOPs (measured: 3.4 % at most, tiny R18 and
# R50 FPNs at 208x128 and 96x96, either importance): how far under its target a pruning may land.
TP_STEP_TOLERANCE = 0.05
ALPHA_ROW = "hill_climb_a"  # + α: hill climbing scored by H with that α (--alphas)


def alpha_row(alpha: float) -> str:
    """The row of hill climbing with H's α = ``alpha``: ``hill_climb_a0.1``."""
    return f"{ALPHA_ROW}{alpha:g}"


def is_search_row(row: str) -> bool:
    """A search row (one of :data:`SEARCH_ROWS`, or an α row of ``--alphas``)."""
    return row in SEARCH_ROWS or row.startswith(ALPHA_ROW)


def row_order(rows: Any) -> list[str]:
    """Rows in table order: the fixed rows, then the α rows by α."""
    extra = sorted((r for r in rows if r not in ROWS), key=lambda r: float(r[len(ALPHA_ROW) :]))
    return [r for r in ROWS if r in rows] + extra


# ---------------------------------------------------------------------- budget accounting
def budget_epochs(
    row: str, trials: int, fast_epochs: float, lineage: int, finetune: float = 0.0
) -> float:
    """Training epochs a row may spend: the search budget ``trials × fast_epochs`` for every
    search; ``lineage × fast_epochs`` for the lineage controls (``lineage``: trials from the root
    to the hill-climbing winner, both included); the search budget plus ``finetune`` epochs for
    ``finetuned`` (its search, then its fine-tune) and every other control."""
    if row not in ROWS and not row.startswith(ALPHA_ROW):
        raise ValueError(f"unknown row {row!r} (known: {', '.join(ROWS)})")
    if row in LINEAGE_ROWS:
        return lineage * fast_epochs
    if is_search_row(row):
        return trials * fast_epochs
    return trials * fast_epochs + finetune


def default_finetune_epochs(trials: int, fast_epochs: float) -> float:
    """``--finetune-epochs`` when not given: half the search budget."""
    return trials * fast_epochs / 2


def pipeline_split(total_epochs: float) -> tuple[float, float]:
    """The pipelining budget: half BN-sparsity training, half distillation."""
    return total_epochs / 2, total_epochs / 2


# ---------------------------------------------------------------------- shared assets
@dataclasses.dataclass
class Shared:
    """The study's base detector and teacher pool, and what every row's scoring needs."""

    spec: Any
    base_path: Path
    pool_path: Path
    study: Any
    ctx: Any  # SearchContext of the shared study: scoring, the pool, the splits
    heldout: Any
    # the Torch-Pruning rows' training schedule where it is not the fast evaluation's
    # (--tp-lr, --tp-warmup): {"lr": ..., "warmup_iters": ...}
    tp_schedule: dict[str, Any] = dataclasses.field(default_factory=dict)


def shared_assets(spec: Any, out: Path) -> Shared:
    """Train (or find in ``runs/<study>/``) the base detector and the pool, once for all rows."""
    from jdsearch.search.caches import run_dir
    from jdsearch.search.session import prepare
    from jdsearch.search.splits import heldout_split

    study, ctx = prepare(spec, f"sqlite:///{out / 'shared.db'}", progress=False)
    base = spec.base_checkpoint or run_dir(spec) / "base.safetensors"
    heldout = heldout_split(spec, ctx.val_set)
    if heldout is None:
        raise SystemExit(
            f"{spec.source}: no held-out split (set data.test or data.max_val_images below the "
            "val set's size): a winner must be judged on images the search never saw"
        )
    pool = run_dir(spec) / "pool.safetensors"
    if not pool.is_file() and spec.pool_checkpoint is not None:
        pool = spec.pool_checkpoint  # the shipped pool, used where it lies (pool.checkpoint)
    return Shared(spec, Path(base), pool, study, ctx, heldout)


def _variant(shared: Shared, row: str, seed: int, trials: int, out: Path) -> Any:
    """The study spec of a search row: the shared base and pool, its strategy, KD mode and
    score (mode, α)."""
    from jdsearch.search.caches import run_dir

    strategy, kd_mode, when = _SEARCH_SETTINGS.get(row, ("hill_climb", "dynamic", None))
    spec = shared.spec
    score = spec.score
    if row == "pareto":
        score = dataclasses.replace(score, mode="pareto")
    elif row.startswith(ALPHA_ROW):
        score = dataclasses.replace(score, alpha=float(row[len(ALPHA_ROW) :]))
    name = f"{spec.name}-sq-{row}-s{seed}".replace("_", "-")
    variant = dataclasses.replace(
        spec,
        name=name,
        base=dataclasses.replace(spec.base, checkpoint=shared.base_path),
        search=dataclasses.replace(
            spec.search,
            strategy=strategy,
            seed=seed,
            n_trials=trials,
            storage=f"sqlite:///{out / 'studies' / (name + '.db')}",
        ),
        kd=dataclasses.replace(spec.kd, mode=kd_mode, when=when or spec.kd.when),
        score=score,
    )
    if shared.pool_path != spec.pool_checkpoint:  # else every variant reads the shipped one
        cache = run_dir(variant) / "pool.safetensors"
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared.pool_path, cache)
    return variant


# ---------------------------------------------------------------------- judging a detector
def _judge(shared: Shared, detector: Any, score: Any) -> dict[str, Any]:
    """Selection H/AP at the best resolution and held-out AP there, FLOPs and params."""
    from jdsearch.core.resolution import Resolution
    from jdsearch.engine.evaluate import evaluate

    res = score.best_resolution
    held = evaluate(detector, shared.heldout, [Resolution.parse(res)], device=shared.spec.device)
    metric = shared.spec.score.metric
    return {
        "resolution": res,
        "h": float(score.value),
        "selection_ap": float(getattr(score.metrics[res], metric)),
        "heldout_ap": float(held[res].AP),
        "heldout_ap50": float(held[res].AP50),
        "flops": int(score.flops.total),
        "flops_at": int(score.flops_at[res]),
        "params": int(score.flops.params),
        "cost": float(score.cost[res]),
    }


def recovered(record: Any) -> int:
    """The training images a trial's local recovery read (0 without one)."""
    return int(record.morph.get("recovery_images", 0))


def run_search_row(shared: Shared, row: str, seed: int, trials: int, out: Path) -> dict[str, Any]:
    """One search: its winner (best H on the selection split) judged on the held-out split."""
    from jdsearch.search.objective import Objective
    from jdsearch.search.queries import best_of, lineage, open_study
    from jdsearch.search.record import TrialRecord, h_of
    from jdsearch.search.run import run_search

    spec = _variant(shared, row, seed, trials, out)
    t0 = time.perf_counter()
    study = run_search(spec, progress=False)
    wall = time.perf_counter() - t0
    trials_ = sorted(study.get_trials(), key=lambda t: t.number)
    best = best_of(trials_)
    handle = open_study(spec.storage_url, spec.name)
    detector = handle.checkpoint(best).detector
    # Every row shares the data, base and score settings: the shared context scores as the trial did.
    score = Objective(shared.ctx).score(best.number, detector)
    records = [TrialRecord.from_trial(t) for t in trials_]
    so_far, best_h = [], -math.inf
    for t in trials_:
        h = h_of(t)
        best_h = max(best_h, h if h is not None else -math.inf)
        so_far.append(best_h)
    winner_path = out / "winners" / f"{row}-s{seed}.safetensors"
    _save(detector, shared, winner_path)
    path = lineage(study, best.number)
    return {
        **_judge(shared, detector, score),
        "trial": best.number,
        "recorded_h": float(h_of(best)),  # type: ignore[arg-type]
        "lineage": [t.number for t in path],
        "moves": [str(TrialRecord.from_trial(t).move) for t in path],
        "best_so_far": so_far,
        "completed": sum(r.value is not None for r in records),
        # a local recovery's images (search.recovery_iters) are training images too
        "train_images": sum((r.train_images or 0) + recovered(r) for r in records),
        "recovery_images": sum(recovered(r) for r in records),
        "wall_s": wall,
        "winner": str(winner_path),
        "study": spec.storage_url,
        "front": heldout_front(shared, handle, trials_),
    }


def run_finetuned_row(
    shared: Shared, seed: int, hill_climb: dict[str, Any], epochs: float, out: Path
) -> dict[str, Any]:
    """The hill-climbing winner fine-tuned for ``epochs`` as a child trial, in a copy of the
    hill-climbing study (whose front and noise floor stay the search's own); its training images
    are the search's plus the fine-tune's."""
    import sqlite3
    from contextlib import closing

    from jdsearch.search.finetune import finetune
    from jdsearch.search.objective import Objective
    from jdsearch.search.queries import open_study
    from jdsearch.search.record import TrialRecord
    from jdsearch.search.session import prepare

    source = Path(hill_climb["study"].removeprefix("sqlite:///"))
    copy = out / "studies" / f"{source.stem}-finetuned.db"
    copy.unlink(missing_ok=True)  # an interrupted fine-tune starts again from the search
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    url = f"sqlite:///{copy}"
    handle = open_study(url)
    study, ctx = prepare(handle.spec, url, progress=False)
    t0 = time.perf_counter()
    trial = finetune(study, ctx, hill_climb["trial"], epochs=epochs)
    wall = time.perf_counter() - t0
    detector = handle.checkpoint(trial, device=shared.spec.device).detector
    score = Objective(shared.ctx).score(trial.number, detector)
    winner_path = out / "winners" / f"finetuned-s{seed}.safetensors"
    _save(detector, shared, winner_path)
    images = int(TrialRecord.from_trial(trial).train_images or 0)
    return {
        **_judge(shared, detector, score),
        "trial": trial.number,
        "parent": hill_climb["trial"],
        "finetune_epochs": epochs,
        "search_images": hill_climb["train_images"],
        "finetune_images": images,
        "train_images": hill_climb["train_images"] + images,
        "wall_s": hill_climb["wall_s"] + wall,
        "winner": str(winner_path),
        "study": url,
    }


def heldout_front(shared: Shared, handle: Any, trials: list[Any]) -> list[dict[str, Any]]:
    """The search's front (non-dominated by selection AP and cost where each trial scored
    best), each trial judged on the held-out split at that resolution."""
    from jdsearch.core.resolution import Resolution
    from jdsearch.engine.evaluate import evaluate
    from jdsearch.search.queries import front_of
    from jdsearch.search.record import TrialRecord

    out = []
    for t in front_of(trials):
        r = TrialRecord.from_trial(t)
        res = str(r.best_resolution)
        detector = handle.checkpoint(t, device=shared.spec.device).detector
        held = evaluate(
            detector, shared.heldout, [Resolution.parse(res)], device=shared.spec.device
        )
        out.append({"trial": t.number, "heldout_ap": float(held[res].AP), "cost": r.cost[res]})
    return out


def base_point(shared: Shared, out: Path) -> tuple[float, float]:
    """The reference of the hypervolume: the base detector's held-out AP at the base resolution,
    and its cost there (1). Measured once, kept in ``out/base_point.json``."""
    path = out / "base_point.json"
    if not path.is_file():
        from jdsearch.engine.evaluate import evaluate

        res = shared.ctx.base_resolution
        held = evaluate(_base(shared), shared.heldout, [res], device=shared.spec.device)
        doc = {"resolution": str(res), "heldout_ap": float(held[str(res)].AP), "cost": 1.0}
        path.write_text(json.dumps(doc, indent=1))
    doc = json.loads(path.read_text())
    return float(doc["heldout_ap"]), float(doc["cost"])


def hypervolume(result: dict[str, Any], base: tuple[float, float]) -> float:
    """HV (AP points × cost) of a row's held-out front relative to the base point; a control's
    front is its one detector."""
    from jdsearch.search.pareto import hypervolume_2d

    front = result.get("front")
    if front is None:  # a control: one detector
        front = [{"heldout_ap": result["heldout_ap"], "cost": result.get("cost", math.inf)}]
    points = [(-100 * p["heldout_ap"], p["cost"]) for p in front]
    return hypervolume_2d(points, (-100 * base[0], base[1]))


def heldout_h(result: dict[str, Any], alpha: float) -> float:
    """H of a winner on the held-out split: its held-out AP at the resolution where it scored
    best on the selection split, times the cost there (the score's, relative to the base) to −α."""
    return result["heldout_ap"] * result["cost"] ** (-alpha)


def _save(detector: Any, shared: Shared, path: Path) -> None:
    from jdsearch.store.checkpoint import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, detector, class_names=shared.ctx.train_set.class_names)


def _base(shared: Shared) -> Any:
    from jdsearch.store.checkpoint import load_checkpoint

    return load_checkpoint(shared.base_path, device=shared.spec.device).detector


def _supernet(shared: Shared) -> Any:
    """The pool's largest sub-network, BN-recalibrated: the controls' teacher."""
    ctx = shared.ctx
    return ctx.pool.teacher(ctx.pool.space.largest(), ctx.train_set, device=shared.spec.device)


def _train(
    shared: Shared,
    detector: Any,
    seed: int,
    epochs: float,
    teacher: Any = None,
    sparsity: float = 0.0,
    schedule: dict[str, Any] | None = None,
) -> int:
    """Train ``detector`` on with the fast evaluation's settings for ``epochs`` (dynamic
    resolution), distilled from ``teacher`` when there is one; returns the images it went
    through. ``schedule``: fast-evaluation fields to override (``lr``, ``warmup_iters``)."""
    from jdsearch.engine.train import train
    from jdsearch.methods.distill import make_distiller
    from jdsearch.methods.morph.pruning import BNSparsity
    from jdsearch.models.heads import stop_recording

    spec, ctx = shared.spec, shared.ctx
    config = dataclasses.replace(
        spec.train_config(spec.fast_eval, seed), epochs=epochs, **(schedule or {})
    )
    terms: list[Any] = []
    if teacher is not None:
        terms.append(make_distiller(detector, teacher, spec.kd, seed=seed))
    if sparsity > 0:
        terms.append(BNSparsity(sparsity))
    result = train(detector, ctx.train_set, config, loss_terms=terms, progress=False)
    stop_recording(detector)
    return result.images


def prune_to(
    detector: Any, target_flops: int, size: tuple[int, int], config: Any
) -> tuple[list[str], Any]:
    """Channel and layer pruning in turn (each by BN slimming's importance) until the detector
    costs at most ``target_flops`` at ``size``, or no pruning action is left. Returns the moves
    and the pruned detector."""
    from jdsearch.methods.morph.actions import evolve, feasible_actions
    from jdsearch.models.flops import count_flops

    moves: list[str] = []
    order = ["channel_prune", "layer_prune"]
    while count_flops(detector, size=size).total > target_flops:
        legal = feasible_actions(detector, config=config)
        step = next((m for m in order if m in legal), None)
        if step is None:
            break
        detector = evolve(detector, step, config=config)
        moves.append(step)
        order.reverse()  # alternate channel and layer pruning
    return moves, detector


# ---------------------------------------------------------------------- Torch-Pruning
def _tp_importance(kind: str) -> Any:
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.BNScaleImportance()


def tp_protected(detector: Any) -> list[Any]:
    """What Torch-Pruning must leave as it is: the FPN (its width feeds the RPN and RoI heads),
    and the 1×1 shortcut conv of every stride-1 projection block, whose residual stream keeps its
    width so that the block keeps the projection :class:`BackboneArch` derives from it."""
    body = detector.backbone.body
    shortcuts = [
        block.shortcut.conv
        for stage in body.stages
        for block in stage
        if block.shortcut is not None and tuple(block.shortcut.conv.stride) == (1, 1)
    ]
    return [detector.backbone.fpn, *shortcuts]


def tp_gradients(detector: Any, data: Any, size: tuple[int, int], seed: int) -> None:
    """Leave in ``detector``'s parameters the detection loss's gradients over
    :data:`TP_TAYLOR_BATCHES` shuffled batches of ``data`` at ``size``, for Torch-Pruning's Taylor
    importance; its BN statistics and train/eval mode come back as they were."""
    import torch

    from jdsearch.core.resolution import Resolution
    from jdsearch.data.coco import cycled_batches, using_resolution
    from jdsearch.methods.morph.importance import restored

    device = next(detector.parameters()).device
    detector.zero_grad(set_to_none=True)
    resolution = Resolution(max(size), min(size))  # (long, short) from (height, width)
    with restored(detector, grads=False), using_resolution(detector, resolution):
        detector.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the detector's own sampling (RPN and RoI minibatches)
            for images, targets in cycled_batches(data, 4, TP_TAYLOR_BATCHES, seed=seed):
                images = [im.to(device) for im in images]
                targets = [
                    {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                    for t in targets
                ]
                sum(detector(images, targets).values()).backward()


def tp_prune_in_place(
    detector: Any,
    target_flops: float,
    size: tuple[int, int],
    importance: str = "bn_scale",
    data: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Torch-Pruning's DepGraph pruner on ``detector.backbone`` (global ranking, ``importance``
    ``bn_scale``, ``l1`` or ``taylor``, :func:`tp_protected` ignored), stepped until jdsearch's
    FLOPs count at ``size`` is at or below ``target_flops`` or the schedule ends; returns what it
    did. ``taylor`` ranks by the gradients :func:`tp_gradients` leaves from ``data`` before each
    step (seeded by ``seed`` and the step)."""
    from importlib.metadata import version

    import torch
    import torch_pruning as tp

    from jdsearch.models.flops import count_flops

    flops = [count_flops(detector, size=size).total]
    example = torch.zeros(1, 3, *size, device=next(detector.parameters()).device)
    pruner = tp.pruner.BasePruner(
        detector.backbone,
        example,
        importance=_tp_importance(importance),
        global_pruning=True,
        pruning_ratio=TP_MAX_RATIO,
        max_pruning_ratio=TP_MAX_RATIO,
        iterative_steps=TP_STEPS,
        ignored_layers=tp_protected(detector),
    )
    if importance == "taylor" and data is None:
        raise ValueError("tp_prune_in_place: Taylor importance needs training data")
    while flops[-1] > target_flops and pruner.current_step < TP_STEPS:
        if importance == "taylor":
            tp_gradients(detector, data, size, seed + pruner.current_step)
        pruner.step()
        flops.append(count_flops(detector, size=size).total)
    return {
        "library": f"torch-pruning {version('torch-pruning')}",
        "importance": importance,
        "target_flops": int(target_flops),
        "target_ratio": target_flops / flops[0],
        "flops_ratio": flops[-1] / flops[0],
        "target_met": flops[-1] <= target_flops,
        "steps": pruner.current_step,
        "channel_ratio": pruner.per_step_pruning_ratio[pruner.current_step],
        "flops_steps": flops,
    }


def described(detector: Any) -> Any:
    """``detector``, whose body was pruned in place, rebuilt as a jdsearch detector: its
    :class:`BackboneArch` read from its modules (each block's conv widths, the stem's; strides,
    groups and the FPN as they were) and its weights loaded into it exactly, so that FLOPs,
    ``arch_key``, latency and checkpoints see the pruned detector.

    Raises:
        CheckpointError: the modules are not what that architecture builds (a shortcut where the
            arch derives none, or the reverse).
    """
    from jdsearch.models.detector import build_detector, load_weights_exactly
    from jdsearch.spec.arch import Block, Stage

    body, arch = detector.backbone.body, detector.arch
    stages = []
    for modules, stage in zip(body.stages, arch.stages, strict=True):
        blocks = []
        for block, old in zip(modules, stage.blocks, strict=True):
            convs = [getattr(block, f"conv{k}", None) for k in (1, 2, 3)]
            widths = tuple(int(c.weight.shape[0]) for c in convs if c is not None)
            blocks.append(Block(widths, old.groups))
        stages.append(Stage(tuple(blocks), stage.stride))
    pruned = dataclasses.replace(arch.with_stages(stages), stem=int(body.stem.conv.weight.shape[0]))
    child = build_detector(detector.spec.with_arch(pruned), detector.spec.num_classes)
    what = f"the arch read from its modules, {pruned.encode()} (stem {pruned.stem})"
    load_weights_exactly(child, detector.state_dict(), source="torch_pruning", what=what)
    return child.to(next(detector.parameters()).device)


def tp_prune(
    detector: Any,
    target_flops: float,
    size: tuple[int, int],
    importance: str = "bn_scale",
    data: Any = None,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """:func:`tp_prune_in_place`, then :func:`described`: the pruned jdsearch detector and what
    the pruning did (with the architecture it ended at)."""
    pruning = tp_prune_in_place(detector, target_flops, size, importance, data, seed)
    detector.zero_grad(set_to_none=True)
    pruned = described(detector)
    return pruned, {**pruning, "arch": pruned.arch.encode(), "stem": pruned.arch.stem}


# ---------------------------------------------------------------------- the controls
def _scored(shared: Shared, detector: Any, path: Path) -> dict[str, Any]:
    """Save a trained control (before anything that can fail after the training), score it as a
    trial is scored and judge it on the held-out split."""
    from jdsearch.search.objective import Objective

    _save(detector, shared, path)
    score = Objective(shared.ctx).score(0, detector)
    return {**_judge(shared, detector, score), "detector": str(path)}


def _trained_control(
    shared: Shared, row: str, seed: int, epochs: float, hill_climb: dict[str, Any]
) -> tuple[Any, int, dict[str, Any]]:
    """A control's detector trained for ``epochs``, the images it went through, and what else
    the row records."""
    detector = _base(shared)
    size = shared.ctx.base_resolution.hw
    if row == "pipelining":
        sparse, distill = pipeline_split(epochs)
        images = _train(shared, detector, seed, sparse, sparsity=PIPELINE_SPARSITY)
        moves, detector = prune_to(detector, hill_climb["flops"], size, shared.ctx.morph_config)
        # distilled as the default search would be: not from a pool the teacher check refused
        distils = shared.ctx.spec.kd.mode != "off"
        teacher = _supernet(shared) if distils else None
        images += _train(shared, detector, seed + 1, distill, teacher)
        return detector, images, {"pruning": moves, "distilled": distils}
    if row in TP_IMPORTANCE:
        detector, pruning = tp_prune(
            detector, hill_climb["flops"], size, TP_IMPORTANCE[row], shared.ctx.train_set, seed
        )
        teacher = _base(shared) if row == "torch_pruning_kd" else None  # the unpruned base
        images = _train(shared, detector, seed, epochs, teacher, schedule=shared.tp_schedule)
        extra = {"pruning": pruning, "distilled": teacher is not None, **_tp_lr(shared)}
        return detector, images, extra
    teacher = _supernet(shared) if row.endswith("_kd") else None
    return detector, _train(shared, detector, seed, epochs, teacher), {}


def _tp_lr(shared: Shared) -> dict[str, Any]:
    """The lr and warm-up a Torch-Pruning row trained at, for its results."""
    fast = shared.spec.fast_eval
    return {
        "lr": shared.tp_schedule.get("lr", fast.lr),
        "warmup_iters": shared.tp_schedule.get("warmup_iters", fast.warmup_iters),
    }


def run_control_row(
    shared: Shared,
    row: str,
    seed: int,
    trials: int,
    hill_climb: dict[str, Any],
    out: Path,
    finetune: float = 0.0,
) -> dict[str, Any]:
    """A control: the base trained on (with or without KD), or pruned (by jdsearch's actions or
    by Torch-Pruning) then trained, for its budget (:func:`budget_epochs`; ``finetune``: the
    fine-tune epochs)."""
    epochs = budget_epochs(
        row, trials, shared.spec.fast_eval.epochs, len(hill_climb["lineage"]), finetune
    )
    if row == TP_FRONT_ROW:
        return run_tp_front(shared, seed, epochs, out)
    t0 = time.perf_counter()
    detector, images, extra = _trained_control(shared, row, seed, epochs, hill_climb)
    wall = time.perf_counter() - t0
    return {
        **_scored(shared, detector, out / "winners" / f"{row}-s{seed}.safetensors"),
        **extra,
        "epochs": epochs,
        "train_images": images,
        "wall_s": wall,
    }


def run_tp_front(shared: Shared, seed: int, epochs: float, out: Path) -> dict[str, Any]:
    """BN-scale Torch-Pruning to each of :data:`TP_FRONT` times the base's FLOPs, each detector
    trained for ``epochs``: the row's figures are its best detector's by H on the selection split,
    its front (for the HV) all of them, its training images theirs together."""
    t0 = time.perf_counter()
    size = shared.ctx.base_resolution.hw
    members = []
    for fraction in TP_FRONT:
        detector, pruning = tp_prune(_base(shared), fraction * shared.ctx.base_flops, size)
        images = _train(shared, detector, seed, epochs, schedule=shared.tp_schedule)
        path = out / "winners" / f"{TP_FRONT_ROW}-s{seed}-{fraction:g}x.safetensors"
        scored = _scored(shared, detector, path)
        members.append({**scored, "fraction": fraction, "pruning": pruning, "train_images": images})
    best = max(members, key=lambda m: m["h"])
    return {
        **best,
        "members": members,
        "front": [
            {"fraction": m["fraction"], "heldout_ap": m["heldout_ap"], "cost": m["cost"]}
            for m in members
        ],
        **_tp_lr(shared),
        "epochs": epochs,
        "train_images": sum(m["train_images"] for m in members),
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------- the table
def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fps_ratios(shared: Shared, results: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Batch-1 FPS of each winner over the base's, timed interleaved pair by pair."""
    from jdsearch.engine.latency import measure_latencies
    from jdsearch.store.checkpoint import load_checkpoint

    base, base_res = _base(shared), str(shared.ctx.base_resolution)
    for _, r in sorted(results.items()):
        path = r.get("winner") or r.get("detector")
        if not path or "fps_ratio" in r:
            continue
        det = load_checkpoint(path).detector
        lat = measure_latencies([(base, base_res), (det, r["resolution"])], repeats=15, warmup=3)
        r["fps_ratio"] = lat[0].median_ms / lat[1].median_ms


def table(shared: Shared, results: dict[tuple[str, int], dict[str, Any]]) -> str:
    """One row per strategy: mean ± sd over seeds."""
    base_flops, base_params = shared.ctx.base_flops, _base_params(shared)
    rows = row_order({name for name, _ in results})
    w = max(14, *(len(r) + 1 for r in rows))
    head = (
        f"{'row':<{w}}{'seeds':>5}  {'held-out AP':>12}  {'sel. AP':>10}  {'FLOPs×':>11}  "
        f"{'params×':>11}  {'FPS×':>11}  {'best H':>15}  {'held-out H':>15}  {'train imgs':>10}  "
        f"{'wall s':>9}  "
        f"{'HV (AP pts × cost)':>19}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        rs = [r for (name, _), r in sorted(results.items()) if name == row]
        if not rs:
            continue

        def cell(key: str, scale: float = 1.0, fmt: str = ".1f", rs: list = rs) -> str:
            m, s = _mean_sd([scale * r[key] for r in rs if r.get(key) is not None])
            return f"{m:{fmt}} ± {s:{fmt}}"

        lines.append(
            f"{row:<{w}}{len(rs):>5}  {cell('heldout_ap', 100):>12}  {cell('selection_ap', 100):>10}  "
            f"{cell('flops', 1 / base_flops, '.2f'):>11}  {cell('params', 1 / base_params, '.2f'):>11}  "
            f"{cell('fps_ratio', 1, '.2f'):>11}  {cell('h', 1, '.4f'):>15}  "
            f"{cell('heldout_h', 1, '.4f'):>15}  "
            f"{statistics.fmean(r['train_images'] for r in rs):>10.0f}  "
            f"{statistics.fmean(r['wall_s'] for r in rs):>9.0f}  "
            f"{cell('hypervolume', 1, '.3f'):>19}"
        )
    return "\n".join(lines)


def _base_params(shared: Shared) -> int:
    return sum(p.numel() for p in _base(shared).parameters())


def write_html(results: dict[tuple[str, int], dict[str, Any]], base_flops: int, path: Path) -> None:
    """Best-so-far H against trials per search row, and held-out AP against FLOPs per winner."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("best-so-far H (selection split)", "winners: held-out AP vs FLOPs"),
    )
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf", "#393b79"]  # fmt: skip
    ordered = row_order({name for name, _ in results})
    colours = {row: palette[i % len(palette)] for i, row in enumerate(ordered)}
    for (row, seed), r in sorted(results.items()):
        if "best_so_far" in r:
            fig.add_trace(
                go.Scatter(
                    x=list(range(len(r["best_so_far"]))),
                    y=r["best_so_far"],
                    mode="lines",
                    line={"color": colours[row]},
                    name=row,
                    legendgroup=row,
                    showlegend=seed == min(s for (n, s) in results if n == row),
                    hovertext=f"{row} seed {seed}",
                ),
                row=1,
                col=1,
            )
    for row in ordered:
        rs = [(s, r) for (n, s), r in sorted(results.items()) if n == row]
        rs = [(s, m) for s, r in rs for m in r.get("members", [r])]  # every detector of a front
        if rs:
            fig.add_trace(
                go.Scatter(
                    x=[r["flops"] / base_flops for _, r in rs],
                    y=[100 * r["heldout_ap"] for _, r in rs],
                    mode="markers",
                    marker={"color": colours[row], "size": 9},
                    name=row,
                    legendgroup=row,
                    showlegend=not any(
                        n == row and "best_so_far" in r for (n, _), r in results.items()
                    ),
                    hovertext=[f"{row} seed {s}" for s, _ in rs],
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="trial", row=1, col=1)
    fig.update_yaxes(title_text="H", row=1, col=1)
    fig.update_xaxes(title_text="FLOPs / base FLOPs (at the base resolution)", row=1, col=2)
    fig.update_yaxes(title_text="held-out AP (%)", row=1, col=2)
    fig.update_layout(height=520, width=1200, title="search quality at equal training budget")
    fig.write_html(path, include_plotlyjs=True)


# ---------------------------------------------------------------------- main
def _load(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    results = {}
    for f in sorted((out / "results").glob("*.json")):
        r = json.loads(f.read_text())
        results[(r["row"], r["seed"])] = r
    return results


def _store(out: Path, row: str, seed: int, result: dict[str, Any]) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    path = out / "results" / f"{row}-s{seed}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"row": row, "seed": seed, **result}, indent=1))
    tmp.replace(path)


def _noise(shared: Shared, results: dict[tuple[str, int], dict[str, Any]], out: Path) -> str:
    """The noise floor: the first seed's hill-climbing winner re-run with three other seeds."""
    path = out / "noise.json"
    if not path.is_file():
        from jdsearch.search.noise import measure_noise
        from jdsearch.search.queries import open_study
        from jdsearch.search.session import prepare

        first = min(s for (row, s) in results if row == "hill_climb")
        url = results[("hill_climb", first)]["study"]
        handle = open_study(url)
        study, ctx = prepare(handle.spec, url, progress=False)
        floor = measure_noise(study, ctx, seeds=3)
        path.write_text(json.dumps({"describe": floor.describe(), **floor.to_dict()}, indent=1))
    return json.loads(path.read_text())["describe"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="studies/quickstart.yaml", help="study spec YAML")
    p.add_argument("--trials", type=int, default=None, help="trials per search (default: spec)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (search.seed)")
    p.add_argument("--seed-list", type=int, nargs="+", help="run only these seeds")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    p.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=[],
        help="also hill climbing with H at each of these α (rows hill_climb_aA)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=float,
        default=None,
        help="epochs of the finetuned row's fine-tune, also added to every control's budget but "
        "the lineage ones (default: half the search budget)",
    )
    p.add_argument(
        "--tp-lr",
        type=float,
        default=None,
        help="the Torch-Pruning rows' training lr (default: the fast evaluation's): a pruned "
        "detector may need a higher one than the search's children",
    )
    p.add_argument(
        "--tp-warmup",
        type=int,
        default=None,
        help="the Torch-Pruning rows' warm-up iterations (default: the fast evaluation's)",
    )
    p.add_argument("--out", default=None, help="default runs/search_quality/<study name>")
    p.add_argument("--table-only", action="store_true", help="print the table of what is there")
    p.add_argument("--no-table", action="store_true", help="only run (a worker of a split run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see README)")
    args = p.parse_args(argv)

    import optuna
    import torch

    from jdsearch.spec.study import load_study

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message=".*experimental.*")
    logging.basicConfig(level=logging.WARNING)
    spec = load_study(args.study)
    trials = args.trials or spec.search.n_trials
    fast = spec.fast_eval.epochs
    finetune = args.finetune_epochs
    if finetune is None:
        finetune = default_finetune_epochs(trials, fast)
    elif not (math.isfinite(finetune) and finetune > 0):
        raise SystemExit(f"--finetune-epochs {finetune:g}: must be a positive number")
    tp_rows = [r for r in args.rows if r in TP_IMPORTANCE or r == TP_FRONT_ROW]
    if tp_rows and not args.table_only and importlib.util.find_spec("torch_pruning") is None:
        raise SystemExit(
            f"--rows {tp_rows[0]}: needs Torch-Pruning, the bench extra: pip install -e '.[bench]'"
        )
    out = Path(args.out or Path("runs") / "search_quality" / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    if args.tp_lr is not None and not (math.isfinite(args.tp_lr) and args.tp_lr > 0):
        raise SystemExit(f"--tp-lr {args.tp_lr:g}: must be a positive number")
    if args.tp_warmup is not None and args.tp_warmup < 0:
        raise SystemExit(f"--tp-warmup {args.tp_warmup}: must be 0 or more")
    schedule = {
        k: v
        for k, v in (("lr", args.tp_lr), ("warmup_iters", args.tp_warmup))
        if v is not None and v != getattr(spec.fast_eval, k)
    }
    trials, finetune = _budget(out, trials, fast, finetune, fixed=not args.table_only, tp=schedule)
    shared = dataclasses.replace(shared_assets(spec, out), tp_schedule=schedule)
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if not args.table_only:
        rows = args.rows + [alpha_row(a) for a in args.alphas]
        _run_all(shared, rows, seeds, trials, out, finetune)
    return 0 if args.no_table else _report(shared, out, trials, finetune)


def _budget(
    out: Path,
    trials: int,
    fast: float,
    finetune: float,
    fixed: bool,
    tp: dict[str, Any] | None = None,
) -> tuple[int, float]:
    """The budget of ``out``'s results, kept in ``out/budget.json``: a run (``fixed``) must use
    the one its results folder holds (one line naming the flag otherwise); the table reads it.
    ``tp``: the Torch-Pruning rows' schedule (--tp-lr, --tp-warmup), held the same way."""
    path = out / "budget.json"
    asked = {
        "trials": trials,
        "finetune_epochs": finetune,
        "fast_eval_epochs": fast,
        "tp_schedule": tp or {},
    }
    if not path.is_file():
        if fixed:
            path.write_text(json.dumps(asked, indent=1))
        return trials, finetune
    held = json.loads(path.read_text())
    for key, flag in (("trials", "--trials"), ("finetune_epochs", "--finetune-epochs")):
        if fixed and held[key] != asked[key]:
            raise SystemExit(
                f"{flag} {asked[key]:g}: {out} holds results of {key} {held[key]:g}; "
                "give another --out"
            )
    if fixed and held.get("tp_schedule", {}) != asked["tp_schedule"]:
        raise SystemExit(
            f"--tp-lr/--tp-warmup {asked['tp_schedule'] or 'unset'}: {out} holds Torch-Pruning "
            f"rows trained with {held.get('tp_schedule') or 'the fast evaluation'}; give another "
            "--out"
        )
    return int(held["trials"]), float(held["finetune_epochs"])


def _run_all(
    shared: Shared, rows: list[str], seeds: list[int], trials: int, out: Path, finetune: float
) -> None:
    todo = row_order(set(rows))
    for seed in seeds:
        for row in todo:
            if (out / "results" / f"{row}-s{seed}.json").is_file():
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {row}, seed {seed} ...", flush=True)
            if is_search_row(row):
                result = run_search_row(shared, row, seed, trials, out)
            else:
                hc = _load(out).get(("hill_climb", seed)) or _hill_climb_first(
                    shared, seed, trials, out
                )
                if row == "finetuned":
                    result = run_finetuned_row(shared, seed, hc, finetune, out)
                else:
                    result = run_control_row(shared, row, seed, trials, hc, out, finetune)
            _store(out, row, seed, result)
            print(
                f"  held-out AP {100 * result['heldout_ap']:.1f}, H {result['h']:.4f}, "
                f"{result['train_images']} images, {result['wall_s']:.0f} s",
                flush=True,
            )


def _hill_climb_first(shared: Shared, seed: int, trials: int, out: Path) -> dict[str, Any]:
    result = run_search_row(shared, "hill_climb", seed, trials, out)
    _store(out, "hill_climb", seed, result)
    return {"row": "hill_climb", "seed": seed, **result}


def _pruning_notes(results: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """A line for each Torch-Pruning that ended above its FLOPs target."""
    lines = []
    for (row, seed), r in sorted(results.items()):
        for m in r.get("members", [r]):
            p = m.get("pruning")
            if isinstance(p, dict) and not p["target_met"]:
                lines.append(
                    f"{row} seed {seed}: Torch-Pruning ended at {p['flops_ratio']:.2f}× the base's "
                    f"FLOPs, above its target {p['target_ratio']:.2f}× (the FPN and heads it "
                    "leaves cost the rest)"
                )
    return lines


def _report(shared: Shared, out: Path, trials: int, finetune: float) -> int:
    results = _load(out)
    if not results:
        print("no results yet", file=sys.stderr)
        return 1
    _fps_ratios(shared, results)
    base = base_point(shared, out)
    for r in results.values():
        r["hypervolume"] = hypervolume(r, base)
        r["heldout_h"] = heldout_h(r, shared.spec.score.alpha)
    for (row, seed), r in results.items():  # the FPS ratios are kept with the results
        _store(out, row, seed, {k: v for k, v in r.items() if k not in ("row", "seed")})
    spec = shared.spec
    print(
        f"\n{spec.name}: {trials} trials × {spec.fast_eval.epochs:g} epochs of "
        f"{len(shared.ctx.train_set)} training images per search, {finetune:g} more epochs for "
        f"finetuned and every control but {' and '.join(LINEAGE_ROWS)}; selection "
        f"{len(shared.ctx.val_set)}"
        f" images, held-out {len(shared.heldout)} images; base {shared.ctx.base_flops / 1e9:.3f} "
        f"GFLOPs at {shared.ctx.base_resolution}\n"
    )
    print(table(shared, results))
    print(
        f"\nHV: the held-out front's area better than the base point (held-out AP "
        f"{100 * base[0]:.1f} at {shared.ctx.base_resolution}, cost {base[1]:g}) in AP points × "
        f"cost ({shared.spec.score.cost}: (C/C_base)·(R/R_base)^{shared.spec.score.beta:g})"
    )
    for line in _pruning_notes(results):
        print(line)
    schedules = {
        (r["lr"], r["warmup_iters"]) for (row, _), r in results.items() if "warmup_iters" in r
    }
    for lr, warmup in sorted(schedules):
        print(f"Torch-Pruning rows trained at lr {lr:g}, warm-up {warmup} (--tp-lr, --tp-warmup)")
    if any(row == "hill_climb" for row, _ in results):
        print("\n" + _noise(shared, results, out))
    write_html(results, shared.ctx.base_flops, out / "search_quality.html")
    print(f"\nfigures: {out / 'search_quality.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
