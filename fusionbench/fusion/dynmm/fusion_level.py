"""Fusion-level Dynamic Multimodal Fusion (DynMM; Xue & Marculescu, "Dynamic Multimodal Fusion", §3.2, §4.3,
Tables 3-4): ESANet (`fusionbench.fusion.esanet`) with a global gate that decides, per image, at how many of
the four encoder stages depth is fused into the RGB stream.

    g = G(f_0, d_0) ∈ Δ^5,  branch k ∈ {0..4}: depth fused at stages 1..k only (k = 4: static ESANet)   (2)
    f_j = w_j · stage_j^rgb(f_{j-1}) + (1 - w_j) · SE-add(stage_j^rgb(f_{j-1}), stage_j^d(d_{j-1})),
          w_j = Σ_{k<j} g_k   (the weight of the branches that stop fusing before stage j)
    L = L_seg + λ · max(0, (1/5) Σ_k mean_b(g_k) · C_k − budget)                                     (3)
    g̃ = softmax(G / τ), τ annealed from soft to hard; hard: one-hot forward, gradient of g̃ (straight-through)

The gate (the public ``GlobalGate``) sees the RGB stream after the stem fusion and max-pool (so it already
holds the stem's depth) and the depth stem: concat → Conv5x5/2 (8) → BN → Tanh → Conv5x5/2 (8) → BN → Tanh →
GAP → 1x1 conv without bias → 5 logits.

Training (the public ``SkipGateESANet.forward``): the depth encoder runs in full and every stage mixes the
RGB-only and the fused features with the weights above: soft weights g̃ (the public best config keeps the
gate soft for all training: ``hard_epoch`` null), or straight-through one-hot g from ``hard_epoch`` on.
Inference with hard routing (the default in eval mode): every image takes one branch k = argmax G, the batch
is split by branch, and **the depth encoder really stops after stage k** (the public code runs it in full and
only counts the saving); outputs equal the mixture with one-hot g (tested).

Costs (``cost``): ``gmacs`` (default) C_k = the measured multiply-adds (GMACs, batch 1, `count_madds`) of the
network routed to branch k minus those of branch 0, i.e. the depth encoder's and SE blocks' share; the public
code uses the depth encoder's thop GMACs [0.25, 4.39, 10.72, 19.72, 24.68], which differ from ours by the
depth stem (always run, for the gate): a constant that no gradient sees, since Σ_k g_k = 1. ``relative``:
the same divided by C_4 (∈ [0, 1], for small models where GMACs are tiny); or a list of 5 numbers used as
given. The total per branch (``branch_gmacs``, gate included) gives the expected cost of a test set:
Σ_k share_k · total_k.

Two stages (§3.4; the public README's best config: stage A "hard-loss1e-4", stage B fine-tunes it with τ
1 → 0.001 over 500 epochs, λ = 1e-4; stage A's settings are not published): ``stage1_ckpt`` loads a trained
ESANet (or DynMM) run's weights, the gate starting fresh, and training continues in stage II; or
``stage1_epochs`` trains stage I in this run with ``stage1_routing``: ``random`` (each image a random branch,
the public ``epoch_ini`` warm-up) or ``static`` (branch 4: ESANet). The gate is trained in stage II only.
`fusionbench.fusion.dynmm.callback.DynMMCallback` sets the stage and τ at every epoch start, logs
``val/stage2_*`` for checkpoint selection and adds the measured routing time to the run record.

Logged (``info``): ``dynmm/share_k<k>`` (fraction of images on branch k, or mean soft weight in training),
``cost/gmacs`` (expected GMACs per image: Σ_k share_k · total_k), ``cost/depth_gmacs`` (the same minus
branch 0's: depth beyond the stem), ``dynmm/resource`` (the unweighted
(1/5) Σ_k mean_b(g_k) C_k), ``dynmm/depth_stages`` (mean k), ``dynmm/temperature``, ``dynmm/stage``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from fusionbench.errors import ConfigError
from fusionbench.fusion.base import FusionOutput
from fusionbench.fusion.dynmm.config import parse_temperature
from fusionbench.fusion.dynmm.routing import anneal_temperature, straight_through
from fusionbench.fusion.esanet import ESANetFusion
from fusionbench.runs import checkpoint_state

log = logging.getLogger("fusionbench")

BRANCHES = 5
ROUTINGS = ("random", "static")


class GlobalGate(nn.Module):
    """The public ``GlobalGate``: two strided 5x5 convs with BN and Tanh, global average pool, 1x1 logits."""

    def __init__(self, channels: int, hidden: int = 8, branches: int = BRANCHES) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 5, stride=2),
            nn.BatchNorm2d(hidden),
            nn.Tanh(),
            nn.Conv2d(hidden, hidden, 5, stride=2),
            nn.BatchNorm2d(hidden),
            nn.Tanh(),
        )
        self.fc = nn.Conv2d(hidden, branches, 1, bias=False)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        x = torch.cat([rgb, depth], dim=1)
        if min(x.shape[-2:]) < 17:  # two unpadded 5x5/2 convs need at least 17 pixels
            raise ConfigError(
                f"DynMM's global gate needs the stem features to be at least 17 pixels high and wide (inputs "
                f"of at least 68 pixels); got {tuple(x.shape[-2:])}. Use larger images."
            )
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1)).flatten(1)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


class FusionLevelDynMM(ESANetFusion):
    """Args (besides ESANet's):
    gate_hidden: the gate's conv width (public: 8).
    temperature: τ, a number or ``{start, end, anneal_epochs, schedule}`` (annealed over stage II).
    hard_epoch: stage-II epoch from which training uses straight-through hard decisions (null: soft for all
        training, the public best config).
    resource_weight: λ (public: 1e-4 with GMACs).
    budget: the hinge's budget (public: 0).
    cost: ``gmacs`` | ``relative`` | five numbers (see the module docstring).
    stage1_epochs: epochs of stage I in this run (0 with ``stage1_ckpt``).
    stage1_routing: ``random`` | ``static`` branches in stage I.
    stage1_ckpt: a ``.ckpt`` (or a pattern matching one) of a trained ESANet / DynMM run to start from.
    route: in eval mode, run each image's branch only (false: the training-time mixture with one-hot g,
        the whole depth encoder always running, as the public code).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        decoder_channels: Sequence[int] = (512, 256, 128),
        decoder_blocks: Sequence[int] = (3, 3, 3),
        context_bins: Sequence[int] = (1, 5),
        se_reduction: int = 16,
        gate_hidden: int = 8,
        temperature: float | Mapping[str, Any] = 1.0,
        hard_epoch: int | None = None,
        resource_weight: float = 1e-4,
        budget: float = 0.0,
        cost: str | Sequence[float] = "gmacs",
        stage1_epochs: int = 0,
        stage1_routing: str = "random",
        stage1_ckpt: str | None = None,
        route: bool = True,
    ) -> None:
        super().__init__(encoders, num_outputs, decoder_channels, decoder_blocks, context_bins, se_reduction)
        if not self.has_depth:
            raise ConfigError(
                "Fusion-level DynMM routes depth: the backbone must build a `depth` encoder too."
            )
        if resource_weight < 0:
            raise ConfigError(f"fusion.resource_weight (λ) must be >= 0, got {resource_weight}.")
        if stage1_routing not in ROUTINGS:
            raise ConfigError(f"fusion.stage1_routing must be one of {ROUTINGS}, got {stage1_routing!r}.")
        cost = _plain(cost)
        if not (cost in ("gmacs", "relative") or (isinstance(cost, list) and len(cost) == BRANCHES)):
            raise ConfigError(f"fusion.cost must be gmacs, relative or {BRANCHES} numbers, got {cost!r}.")
        self.cost_form = cost if isinstance(cost, str) else "fixed"
        self.gate = GlobalGate(2 * self.channels[0], int(gate_hidden))
        self.temperature_schedule = parse_temperature(_plain(temperature))
        self.hard_epoch = None if hard_epoch is None else int(hard_epoch)
        self.resource_weight, self.budget = float(resource_weight), float(budget)
        self.stage1_epochs, self.stage1_routing = int(stage1_epochs), stage1_routing
        self.route = bool(route)
        self.register_buffer("stage", torch.tensor(2 if stage1_epochs == 0 else 1))
        self.register_buffer("temperature", torch.tensor(self.temperature_schedule["start"]))
        self.register_buffer("hard", torch.tensor(False))
        self.register_buffer(
            "fixed_costs",
            torch.tensor(cost if isinstance(cost, list) else [0.0] * BRANCHES, dtype=torch.float),
        )
        self.driven = False
        self.stage1_loaded = False
        if stage1_ckpt:
            self.load_stage1(str(stage1_ckpt))

    # -- stage I from a run, stages, temperature ------------------------------------------------------
    def load_stage1(self, path: str) -> None:
        """Weights of a trained ESANet (or DynMM) run; the gate and the cost buffers keep their own."""
        state = checkpoint_state(
            path,
            what="fusion.stage1_ckpt",
            missing_hint="Pass the selected checkpoint of a fusion=esanet run of the same backbone and seed.",
        )
        if any(k.startswith("model.") for k in state):  # a Lightning checkpoint of a FusionTask
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        own = self.state_dict()
        keep = ("gate.", "stage", "temperature", "hard", "branch_madds", "costs_measured", "fixed_costs")
        wanted = [k for k in own if not k.startswith(keep)]
        missing = [k for k in wanted if k not in state]
        wrong = [k for k in wanted if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            raise ConfigError(
                f"fusion.stage1_ckpt={path} is not an ESANet of this backbone (missing {missing[:3]}, shape "
                f"differs for {wrong[:3]}). Use the checkpoint of a fusion=esanet run with the same backbone."
            )
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        self.stage1_loaded = True
        self.stage.fill_(2)

    def stage_at(self, epoch: int) -> int:
        return 1 if epoch < self.stage1_epochs and not self.stage1_loaded else 2

    def set_epoch(self, epoch: int) -> None:
        """Stage, τ (annealed from the first stage-II epoch) and hard decisions for training ``epoch``."""
        self.stage.fill_(self.stage_at(epoch))
        start = 0 if self.stage1_loaded else self.stage1_epochs
        k = max(epoch - start, 0)
        s = self.temperature_schedule
        self.temperature.fill_(anneal_temperature(k, s["start"], s["end"], s["anneal_epochs"], s["schedule"]))
        self.hard.fill_(self.hard_epoch is not None and k >= self.hard_epoch)

    # -- costs ------------------------------------------------------------------------------------------
    def costs(self) -> torch.Tensor:
        """C_k of the resource loss."""
        if self.cost_form == "fixed":
            return self.fixed_costs
        extra = (self.branch_madds - self.branch_madds[0]).double() / 1e9
        if self.cost_form == "relative":
            extra = extra / extra[-1].clamp_min(1e-12)
        return extra.float()

    # -- forward ------------------------------------------------------------------------------------
    def decisions(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """g (B, 5): stage I's random / static one-hot, else the gate's (soft, or straight-through hard)."""
        b = rgb.shape[0]
        if self.forced_branch is not None:
            return F.one_hot(torch.full((b,), self.forced_branch, device=rgb.device), BRANCHES).to(rgb.dtype)
        if int(self.stage) == 1:
            if self.stage1_routing == "static":
                index = torch.full((b,), BRANCHES - 1, device=rgb.device)
            else:
                index = torch.randint(0, BRANCHES, (b,), device=rgb.device)
            return F.one_hot(index, BRANCHES).to(rgb.dtype)
        soft = F.softmax(self.gate(rgb, depth) / float(self.temperature), dim=-1)
        return straight_through(soft) if (bool(self.hard) or not self.training) else soft

    def mixture(self, rgb: torch.Tensor, depth: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The training-time forward: every stage mixes RGB-only and fused features (the depth encoder runs
        in full)."""
        skips = []
        for i in range(4):
            rgb = self.encoders["rgb"].forward_stage(i, rgb)
            depth = self.encoders["depth"].forward_stage(i, depth)
            w = g[:, : i + 1].sum(dim=1).view(-1, 1, 1, 1)  # branches k <= i do not fuse at stage i + 1
            rgb = w * rgb + (1 - w) * self.fusions[i + 1](rgb, depth)
            if i < 3:
                skips.append(rgb)
        return rgb, skips

    def routed(self, rgb: torch.Tensor, depth: torch.Tensor, branch: torch.Tensor) -> FusionOutput:
        """Hard inference: each group of images runs its branch only, the depth encoder stopping after it."""
        outputs: torch.Tensor | None = None
        for k in torch.unique(branch).tolist():
            idx = torch.nonzero(branch == k).flatten()
            r, d = rgb[idx], depth[idx]
            skips = []
            for i in range(4):
                r = self.encoders["rgb"].forward_stage(i, r)
                if i < k:
                    d = self.encoders["depth"].forward_stage(i, d)
                    r = self.fusions[i + 1](r, d)
                if i < 3:
                    skips.append(r)
            logits = self.decode(r, skips).logits
            if outputs is None:
                outputs = logits.new_empty((rgb.shape[0], *logits.shape[1:]))
            outputs[idx] = logits
        return FusionOutput(outputs, None, {})

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> FusionOutput:
        self.check_inputs(inputs)
        if not bool(self.costs_measured) and self.forced_branch is None:
            self.measure_costs(
                inputs
            )  # once, on the first batch (the callback's setup pass, before training)
        rgb, depth = self.stems(inputs)
        g = self.decisions(rgb, depth)
        if not self.training and self.route:
            out = self.routed(rgb, depth, g.argmax(dim=-1))
        else:
            out = self.decode(*self.mixture(rgb, depth, g))
        costs = self.costs().to(g.device, g.dtype)
        resource = (g.mean(dim=0) * costs).mean()  # (1/5) Σ_k mean_b(g_k) C_k, the public form
        aux = None
        if self.training and int(self.stage) == 2 and self.resource_weight > 0:
            aux = self.resource_weight * torch.clamp(resource - self.budget, min=0.0)
        share = F.one_hot(g.argmax(-1), BRANCHES).to(g.dtype).mean(0) if not self.training else g.mean(0)
        share = share.detach()
        info: dict[str, torch.Tensor | float] = {f"dynmm/share_k{k}": share[k] for k in range(BRANCHES)}
        info["dynmm/depth_stages"] = (share * torch.arange(BRANCHES, device=share.device)).sum()
        info["dynmm/resource"] = resource.detach()
        info.update(self.cost_info(share))
        info["dynmm/temperature"] = float(self.temperature)
        info["dynmm/stage"] = float(self.stage)
        return FusionOutput(out.logits, aux, info, out.extras)

    # -- measured inference time (the run record's ``dynmm_timing``) --------------------------------------
    def time_routing(
        self, inputs: Mapping[str, torch.Tensor], batch_sizes: Sequence[int] = (1,), repeats: int = 3
    ) -> dict[str, Any]:
        """Milliseconds per image of routed inference against every image forced to each branch (branch 4 =
        static ESANet, the depth encoder in full) and the public form (the mixture, full depth encoder); the
        timer of `fusionbench.fusion.dynmm.timing`."""
        from fusionbench.fusion.dynmm.timing import _pass_ms  # timing imports the modality-level model

        was_training, route = self.training, self.route
        self.eval()
        device = inputs["rgb"].device
        n = inputs["rgb"].shape[0]

        def ms(chunks: list, setup: dict) -> float:
            self.forced_branch, self.route = setup.get("branch"), setup.get("route", True)
            return _pass_ms(self, chunks, n, repeats, device)

        try:
            with torch.no_grad():
                branch = self.decisions(*self.stems(inputs)).argmax(-1)
            out: dict[str, Any] = {
                "samples": n,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "shares": {f"k{k}": float((branch == k).float().mean()) for k in range(BRANCHES)},
                "branch_gmacs": [float(v) / 1e9 for v in self.branch_madds.tolist()],
                "ms_per_sample": {},
            }
            for b in batch_sizes:
                chunks = [{m: x[i : i + int(b)] for m, x in inputs.items()} for i in range(0, n, int(b))]
                row = {"routed": ms(chunks, {}), "mixture_full_depth": ms(chunks, {"route": False})}
                row.update({f"branch_{k}": ms(chunks, {"branch": k}) for k in range(BRANCHES)})
                row["speedup_vs_static"] = row["branch_4"] / row["routed"] if row["routed"] > 0 else None
                out["ms_per_sample"][str(int(b))] = row
            return out
        finally:
            self.forced_branch, self.route = None, route
            self.train(was_training)


__all__ = ["FusionLevelDynMM", "GlobalGate"]
