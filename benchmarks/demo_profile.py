"""Where the demo's time goes: run `longtail demo` (one seed by default) under cProfile and print the share of the
run spent per stage (the run's own ``stage_seconds``) and per part (training forward / backward / optimizer /
augmentation / data loading, evaluation passes, generation: UNet / VAE decode / guidance / text encoder, image
writes, judge and mode detector, captioner).

    OMP_NUM_THREADS=2 python benchmarks/demo_profile.py --out /tmp/demo_profile [--quick] [--seeds 0]
    python benchmarks/demo_profile.py --load /tmp/demo_profile/profile.pstats    # re-read a saved profile

Shares, not absolute seconds, are the point: they hold on a busy machine, where seconds do not. Parts are
nested (a part's share includes its children's) and cProfile's cumulative time of a function, summed over all
its callers; the profiler's own overhead is counted in the total, so Python-heavy parts read somewhat high.
The run directory is fresh each time (an existing ``--out`` is refused: a resumed run would skip its stages).

Measured here (``--quick``, OMP_NUM_THREADS=1, a 2-core machine shared with other jobs, so shares only):
generation 35.2% (UNet 25.3%, guidance 9.0%, VAE decode 4.3%, text encoder 0.1%), classifier evaluation 32.3%
(the nine nuisance splits 29.4%), classifier training 22.4% (augmentation 0.4%, data loading 1.1%, Adam 0.2%),
keyword embedder 2.9%, mode detector 1.6%, distances 1.1%.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

# (indent, label, [(file suffix, function name), ...]): the cumulative time of the listed functions, summed
PARTS: list[tuple[int, str, list[tuple[str, str]]]] = [
    (0, "classifier training (fit)", [("longtail/train.py", "fit")]),
    (1, "forward (train mode)", []),  # the model calls made by fit itself: training_forward
    (1, "backward", [("torch/autograd/__init__.py", "backward")]),
    (1, "optimizer step (Adam)", [("torch/optim/adam.py", "step")]),
    (1, "augmentation (rotate / shift / flip)", [("longtail/train.py", "augment")]),
    (1, "data loading (DataLoader batches)", [("torch/utils/data/dataloader.py", "__next__")]),
    (0, "classifier evaluation (predict_loader)", [("longtail/train.py", "predict_loader")]),
    (1, "of which the extra (nuisance) splits", [("longtail/jobs/stages.py", "evaluate_splits")]),
    (0, "generation (generate)", [("longtail/generate.py", "generate")]),
    (1, "UNet (denoise)", [("longtail/models/ldm.py", "denoise")]),
    (1, "VAE decode", [("longtail/models/ldm.py", "decode")]),
    (1, "guidance (LongtailGuide.__call__)", [("longtail/guidance.py", "__call__")]),
    (1, "text encoder (encode_prompts)", [("longtail/models/ldm.py", "encode_prompts")]),
    (0, "synthetic store writes (SyntheticStore.add)", [("longtail/data/store.py", "add")]),
    (0, "synthetic images read back (synthetic_inputs)", [("longtail/data/sources.py", "synthetic_inputs")]),
    (0, "judge scoring (sweep)", [("longtail/calibrate.py", "_judged")]),
    (0, "mode detector (modes stage)", [("longtail/jobs/stages.py", "stage_modes")]),
    (0, "captioner (introspection)", [("longtail/introspection/captioners.py", "caption")]),
    (0, "keyword embedder (introspection)", [("longtail/introspection/keywords.py", "mine_keywords")]),
    (0, "feature distances", [("longtail/jobs/stages.py", "stage_distances")]),
    (0, "set-up: data, generator, classifier loads", [("longtail/jobs/mine.py", "_set_up")]),
]


def cumulative(stats: pstats.Stats, targets: list[tuple[str, str]]) -> float:
    """Summed cumulative seconds of the functions ``(file suffix, name)`` in a cProfile table."""
    total = 0.0
    for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if any(filename.replace("\\", "/").endswith(suffix) and name == fn for suffix, fn in targets):
            total += ct
    return total


def training_forward(stats: pstats.Stats) -> float:
    """Forward time inside ``fit``: the model calls made directly by ``fit`` (cProfile's per-caller split)."""
    total = 0.0
    for (filename, _line, name), (_cc, _nc, _tt, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name in ("_wrapped_call_impl", "_call_impl") and filename.endswith("torch/nn/modules/module.py"):
            for (cfile, _cl, cname), value in callers.items():
                if cfile.endswith("longtail/train.py") and cname == "fit":
                    total += value[3]
    return total


def print_profile(stats: pstats.Stats, wall: float, stage_seconds: dict | None) -> None:
    """Shares of ``wall`` per stage and per part."""
    if stage_seconds:
        print(f"\nper stage (the run's stage_seconds; share of {wall:.1f} s profiled wall time):")
        for name, sec in sorted(stage_seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<28} {sec:8.1f} s  {100 * sec / wall:5.1f}%")
    print("\nper part (cumulative, nested; share of the profiled total):")
    for indent, label, targets in PARTS:
        sec = cumulative(stats, targets) if targets else training_forward(stats)
        print(f"  {'  ' * indent}{label:<{46 - 2 * indent}} {sec:8.1f} s  {100 * sec / wall:5.1f}%")
    print("\ntop 25 functions by own time:")
    stats.sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/demo_profile", help="fresh run directory (profile.pstats goes in it)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: one seed, 0)")
    ap.add_argument("--quick", action="store_true", help="the --quick demo's sizes")
    ap.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    ap.add_argument("--load", help="print a saved profile (profile.pstats) instead of running")
    args = ap.parse_args(argv)
    if args.load:
        run = Path(args.load).parent
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        stats = pstats.Stats(args.load)
        print_profile(stats, stats.total_tt, metrics.get("stage_seconds"))  # type: ignore[attr-defined]
        return
    from longtail.allocator import keep_freed_memory
    from longtail.jobs.mine import load_demo_config, quick_overrides, run_mine

    keep_freed_memory()  # as the `longtail` command does before any job
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists: a resumed run would skip its stages; pass a fresh --out")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    top = {**(quick_overrides() if args.quick else {}), "seeds": seeds, "out": str(out)}
    cfg = load_demo_config(None, args.set, top=top)
    print("profiling: longtail demo --out " + " ".join(
        [str(out), "--seeds", args.seeds, *(["--quick"] if args.quick else []),
         *[x for s in args.set for x in ("--set", s)], "--no-progress"]), flush=True)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    try:
        run_mine(cfg, show=False)
    finally:
        profiler.disable()
    wall = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(out / "profile.pstats")
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"\nprofile saved: {out / 'profile.pstats'} (python {Path(__file__).name} --load it)")
    print_profile(pstats.Stats(profiler), wall, metrics.get("stage_seconds"))


if __name__ == "__main__":
    main()
