"""Measured inference time of fusion-level DynMM at NYU Depth V2 scale: ESANet with depth fused at the first
k = 0..4 stages (the depth encoder really stopping after stage k; k = 4 is static ESANet), the public form
(the whole depth encoder run and mixed, as FusionDynMM does), and routed batches with a given branch mix.
Random weights (speed does not depend on them), 40 classes, the decoder of configs/fusion/dynmm_esanet.yaml.

    python scripts/bench_esanet.py --arch resnet50 --size 480 640 --out results/dynmm_nyuv2_timing.md
    python scripts/bench_esanet.py --device cuda --out results/dynmm_nyuv2_timing_gpu.md
    python scripts/bench_esanet.py --runs results/runs/dynmm_rgbd_synthetic_lam1/seed=* \
        --out results/dynmm_rgbd_timing.md

With ``--runs``: trained fusion-level DynMM runs instead, each timed on its first ``--samples`` test images by
`FusionLevelDynMM.time_routing` (the measurement DynMM runs write to their record, here on a quiet machine):
routed inference against every image forced to each branch (k = 4: static ESANet) and the public mixed form.

Per branch: GMACs at batch 1 (`fusionbench.compute.count_madds`) and milliseconds per image (median of
``--repeats`` passes after a warm-up, eval mode, no gradients). The routed rows use the shares of DynMM's
Table 3 (from the public code's depth-GMACs: DynMM-a / DynMM-b) to show what a real mix saves per image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fusionbench.compute import count_madds
from fusionbench.encoders import ResNetTrunk
from fusionbench.fusion import FusionLevelDynMM
from fusionbench.fusion.dynmm.timing import _sync

# branch shares whose expected depth cost matches the paper's Table 3 rows (11.1 and 19.5 depth GMACs of the
# public branch costs [0.25, 4.39, 10.72, 19.72, 24.68]); the paper does not publish its shares
MIXES = {
    "all k=0": [1, 0, 0, 0, 0],
    "mix ~ DynMM-a": [0.3, 0.2, 0.2, 0.1, 0.2],
    "mix ~ DynMM-b": [0.1, 0.1, 0.1, 0.2, 0.5],
}


def interleaved_ms(
    model: FusionLevelDynMM, x: dict, variants: list[tuple[int, bool]], repeats: int, device: torch.device
) -> list[float]:
    """Median ms per image of each (forced branch, route) variant. The variants take turns within every
    repeat, so a slow stretch of the machine (other load, clock changes) hits all of them alike instead of
    whichever ran in it."""
    samples: list[list[float]] = [[] for _ in variants]
    with torch.no_grad():
        for r in range(repeats + 1):  # round 0 warms up
            for i, (branch, route) in enumerate(variants):
                model.forced_branch, model.route = branch, route
                _sync(device)
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                if r:
                    samples[i].append(time.perf_counter() - t0)
    model.forced_branch, model.route = None, True
    return [1000.0 * statistics.median(t) / x["rgb"].shape[0] for t in samples]


def bench_runs(args: argparse.Namespace) -> str:
    from fusionbench.errors import FusionbenchError
    from fusionbench.fusion.dynmm.timing import first_test_inputs
    from fusionbench.runs import load_run

    lines = [
        "### Fusion-level DynMM, trained runs: measured ms per image, routed against each branch",
        "",
        f"`python scripts/bench_esanet.py --runs ... --samples {args.samples} --batch {args.batch} "
        f"--repeats {args.repeats}{f' --threads {args.threads}' if args.threads else ''}`; "
        f"{torch.get_num_threads()} CPU threads, nothing else running; median over the repeats after a "
        "warm-up, per image. Shares: the routing of these test images. Static: every image on k = 4 "
        "(ESANet). A small model at batch 1 is dominated by per-call overhead and timer noise: the spread of "
        "the static column over runs of one architecture is the noise level.",
        "",
        "| run | shares k=0..4 | routed | static (k=4) | k=0 | public form | static / routed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in args.runs:
        try:
            _, dm, task = load_run(run)
        except FusionbenchError as e:
            raise SystemExit(f"bench_esanet: {e}") from None
        if not isinstance(task.model, FusionLevelDynMM):
            raise SystemExit(
                f"bench_esanet: {run} is not a fusion=dynmm_esanet run (its model is "
                f"{type(task.model).__name__})."
            )
        dm.setup("test")
        model = task.model
        out = model.time_routing(first_test_inputs(dm, args.samples), [args.batch], args.repeats)
        ms = out["ms_per_sample"][str(args.batch)]
        shares = " / ".join(f"{v:.2f}" for v in out["shares"].values())
        lines.append(
            f"| {run} | {shares} | {ms['routed']:.2f} | {ms['branch_4']:.2f} | {ms['branch_0']:.2f} | "
            f"{ms['mixture_full_depth']:.2f} | {ms['branch_4'] / ms['routed']:.2f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet34", "resnet50"))
    p.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="trained fusion-level DynMM run folders")
    p.add_argument("--samples", type=int, default=64, help="--runs: test images timed per run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs:
        text = bench_runs(args)
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoders = {"rgb": ResNetTrunk(args.arch, 3), "depth": ResNetTrunk(args.arch, 1)}
    model = FusionLevelDynMM(encoders, 40).to(device).eval()
    h, w = args.size
    x = {
        "rgb": torch.randn(args.batch, 3, h, w, device=device),
        "depth": torch.randn(args.batch, 1, h, w, device=device),
    }
    with torch.no_grad():
        model({m: v[:1] for m, v in x.items()})  # measures the branch MAdds
    gmacs = [v / 1e9 for v in model.branch_madds.tolist()]
    # (branch, route) per forward; k = 4 with route=False is the public form
    variants = [(k, True) for k in range(5)] + [(4, False)]
    times = interleaved_ms(model, x, variants, args.repeats, device)
    names = [f"k={k}" + (" (static ESANet)" if k == 4 else "") for k in range(5)]
    names.append("public form (full depth encoder, mixed)")
    rows = [(name, gmacs[k], ms) for name, (k, _), ms in zip(names, variants, times, strict=True)]
    static = rows[4][2]
    lines = [
        f"### Fusion-level DynMM inference time, ESANet-{args.arch[6:]} at {h} x {w}, batch {args.batch}",
        "",
        f"`python scripts/bench_esanet.py --arch {args.arch} --size {h} {w} --batch {args.batch} "
        f"--repeats {args.repeats}{f' --threads {args.threads}' if args.threads else ''} "
        f"--device {args.device}`; {device.type}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, random weights, 40 classes; "
        "median ms per image over the repeats after a warm-up round, the forwards taking turns within each "
        "repeat. GMACs at batch 1 include the gate.",
        "",
        "| forward | GMACs | ms / image | vs static |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {g:.2f} | {ms:.1f} | {static / ms:.2f}x |" for name, g, ms in rows]
    for name, share in MIXES.items():  # expected time of a test set routed with these shares
        ms = sum(s * rows[k][2] for k, s in enumerate(share))
        g = sum(s * gmacs[k] for k, s in enumerate(share))
        lines.append(f"| routed, {name} {share} (expected) | {g:.2f} | {ms:.1f} | {static / ms:.2f}x |")
    model.forced_branch = 4  # where static ESANet's multiply-adds go (top-level modules of the network)
    by_module = count_madds(model, {m: v[:1] for m, v in x.items()}).by_module
    model.forced_branch = None
    decoder = sum(
        v for k, v in by_module.items() if k.split(".")[0] in ("context", "skips", "decoder", "head")
    )
    lines += [
        "",
        f"Of static ESANet's {gmacs[4]:.2f} GMACs, {decoder / 1e9:.2f} are the decoder side (context module, "
        f"skips, decoder, head) and {(gmacs[4] * 1e9 - decoder) / 1e9:.2f} the two encoders with their SE "
        "fusions (`fusionbench.compute.count_madds`, batch 1).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
