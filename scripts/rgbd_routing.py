"""Where depth matters and where fusion-level DynMM sends it, on the synthetic RGB-D study: for finished runs
of dataset=rgbd_synthetic, the test mIoU on lit and on dark scenes separately (dark scenes need depth: their
class pairs share a colour) and, for DynMM runs, the share of each branch k among lit and dark test images.

    python scripts/rgbd_routing.py results/runs/dynmm_rgbd_synthetic_*/seed=* \
        --out results/dynmm_rgbd_routing.md

Each run is rebuilt from its config with the weights of its tested checkpoint (`fusionbench.runs`); nothing is
retrained. Rows: one per experiment, mean over its seeds (n = seeds found).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import fusionbench.train  # noqa: F401  (registers the config resolvers)
from fusionbench.errors import ConfigError, FusionbenchError
from fusionbench.fusion import FusionLevelDynMM
from fusionbench.metrics.segmentation import confusion_matrix, logits_to_labels, miou
from fusionbench.runs import load_run, run_config

KINDS = ("lit", "dark")


@torch.no_grad()
def analyse(folder: Path) -> tuple[str, dict[str, float]]:
    if run_config(folder).dataset.get("_target_", "").rsplit(".", 1)[-1] != "RGBDSyntheticDataModule":
        raise ConfigError(
            f"{folder} is not a dataset=rgbd_synthetic run; only those have lit and dark scenes."
        )
    cfg, dm, task = load_run(folder)
    model = task.model.eval()
    dm.setup("test")
    c = dm.num_outputs
    conf = {k: torch.zeros(c, c, dtype=torch.long) for k in KINDS}
    branches: dict[str, list[int]] = {k: [] for k in KINDS}
    for batch in dm.test_dataloader():
        inputs, target, dark = batch["inputs"], batch["target"], batch["meta"]["dark"].bool()
        pred = logits_to_labels(model(inputs).logits, tuple(target.shape[-2:]))
        if isinstance(model, FusionLevelDynMM):
            k = model.decisions(*model.stems(inputs)).argmax(-1)
        for kind, mask in (("lit", ~dark), ("dark", dark)):
            if mask.any():
                conf[kind] += confusion_matrix(pred[mask], target[mask], c)
                if isinstance(model, FusionLevelDynMM):
                    branches[kind] += k[mask].tolist()
    out = {f"miou_{kind}": float(miou(conf[kind])) for kind in KINDS}
    for kind in KINDS:
        for b in range(5):
            if branches[kind]:
                out[f"{kind}_k{b}"] = float(np.mean(np.array(branches[kind]) == b))
    return str(cfg.experiment_name), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders of dataset=rgbd_synthetic")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    per: dict[str, list[dict[str, float]]] = defaultdict(list)
    for folder in args.runs:
        try:
            name, values = analyse(folder)
        except FusionbenchError as e:
            sys.exit(f"rgbd_routing: {e}")
        per[name].append(values)
        print(folder, values, flush=True)
    head = ["experiment", "n", "mIoU lit", "mIoU dark"]
    head += [f"lit k={b}" for b in range(5)] + [f"dark k={b}" for b in range(5)]
    lines = [
        "### Synthetic RGB-D study: mIoU and DynMM's branches on lit vs dark test scenes",
        "",
        "`python scripts/rgbd_routing.py "
        + " ".join(str(r) for r in args.runs[:2])
        + " ...` (every run of the "
        "study; mean over seeds). Dark scenes need depth (class pairs share a colour); lit scenes do not. "
        "k = number of encoder stages that fuse depth (k = 0: the stem only). mIoU in %; shares of test "
        "images.",
        "",
        "| " + " | ".join(head) + " |",
        "| --- | ---: | " + " | ".join(["---:"] * (len(head) - 2)) + " |",
    ]
    for name in sorted(per):
        rows = per[name]

        def mean(key: str, scale: float = 1.0, digits: int = 2) -> str:
            vals = [r[key] for r in rows if key in r]
            return f"{np.mean(vals) * scale:.{digits}f}" if vals else "—"

        cells = [name, str(len(rows)), mean("miou_lit", 100, 1), mean("miou_dark", 100, 1)]
        cells += [mean(f"{kind}_k{b}") for kind in KINDS for b in range(5)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
