"""Modality-level Dynamic Multimodal Fusion (DynMM; Xue & Marculescu, "Dynamic Multimodal Fusion",
§3.1, 3.3, 3.4): a gate looks at all modalities and routes every sample to one of B experts, each a
complete fusion model of the project over a subset of the modalities.

    y = Σ_i g_i E_i(x_i),  g = one_hot(argmax G(x))                                    (1)
    L = L_task + λ Σ_i g_i C(E_i)                                                      (3)
    g̃_i = softmax((log G(x)_i + b_i) / τ),  b_i ~ Gumbel(0, 1)                          (5)

Experts are declared by config (``experts: {name: {fusion, modalities, args}}``) and built like any
fusion model (`fusionbench.fusion.profusion.build_base`: a config name such as ``concat`` or a node with
``_target_``), each from its own deep copies of the backbone's encoders for its modalities; the
originals are not kept. ``modalities`` lists names or positions in the sorted modality list (``[0]``:
the first), or ``all``.

Decisions (``gating``):

- ``gumbel`` (the paper, eq. 5): Gumbel-softmax with temperature τ and the straight-through estimator:
  the forward pass uses the hard one-hot g, the backward pass the gradient of the soft g̃.
  ``log G(x)`` is the log-softmax of the gate's logits, which differs from the logits by a per-sample
  constant that the softmax cancels, so the logits are used directly.
- ``softmax`` (the public code's reported form, benchmark-specs §0.2): the same straight-through
  estimator on a deterministic temperature softmax, without Gumbel noise.
- ``soft`` (DynMM-d): every expert runs, in training and at inference, and the output is the mixture
  Σ_i softmax(G(x)/τ)_i E_i(x_i); there is no hard routing.

With hard decisions, inference executes only the selected expert for each sample: the batch is split by
decision, each expert runs on its own samples only, and the outputs are scattered back. In training all
experts run on the whole batch, because the straight-through gradient of g_i is E_i(x_i) itself
(frozen experts run without autograd). The noise is drawn in training only; inference takes the
argmax of the gate's logits.

Resource loss (``aux_loss``, eq. 3): λ (``resource_weight``) times the batch mean of Σ_i g_i C_i, with
g the decision vector of the forward pass (straight-through: its value is the chosen expert's cost,
its gradient flows through g̃). λ is the only weight on it: the task adds ``aux_loss`` as it is.
``cost``:

- ``madds`` (default): C_i = expert i's multiply-adds at batch 1 (`fusionbench.compute.count_madds`, on
  the first sample of the first batch the model sees), divided by the largest expert's, so C ∈ [0, 1]
  and λ has the scale of the task loss. The raw counts are buffers (``expert_madds``,
  ``gate_madds``), so they travel with checkpoints.
- ``share``: the public code's form, λ · mean_b(g_last): the gate weight of the *last declared* expert
  (the full-fusion expert; its costs are "normalised" to 0 for every other expert and 1 for it). The
  public 2-expert scripts use exactly this; their unused 3-expert gate also charges only the last expert.
- a mapping ``{expert: cost}``: fixed costs, used as given (e.g. the paper's thop counts).

Two-stage training (§3.4): stage I trains every expert for ``stage1_epochs`` epochs on the sum of the
experts' own task losses (returned by ``target_loss(output, target)``, which `FusionTask` adds; their
own auxiliary losses, e.g. DEQ's Jacobian term, form the ``aux_loss``); the gate is not trained (it
runs without autograd, for the routing statistics only) and the output is the uniform mixture of the
experts (detached, so it only reports a loss). Stage II trains the gate with the gated output's task
loss plus the resource loss; the experts are fine-tuned with it (the paper) or frozen
(``freeze_experts: true``, the public code's ``--freeze``; frozen experts also keep their running
statistics and run without dropout). ``stage1_ckpt`` loads the experts from a checkpoint of an earlier
run and skips stage I. The stage and the temperature are buffers, set at every epoch start by
`fusionbench.fusion.dynmm.callback.DynMMCallback`, which also logs ``val/stage2_loss`` (``val/loss`` in stage
II, +inf in stage I) for checkpoint selection; DynMM experiments monitor it
(``callbacks.model_checkpoint.monitor=val/stage2_loss``).

Logged (``info``): ``dynmm/share_<expert>`` (batch share of the decisions: the fraction of samples
routed to each expert, or the mean soft weight), ``dynmm/madds`` (MAdds per sample that inference
spends: Σ_i share_i C_i + the gate's MAdds with hard routing, Σ_i C_i + the gate's with soft gating or
in stage I, where every expert runs), ``dynmm/gate_madds``, ``dynmm/resource`` (the unweighted
Σ_i g_i C_i), ``dynmm/temperature`` and ``dynmm/stage``. Unlike the public scripts, the gate's cost is
counted.

Gates (``gate``): ``mlp`` (default; MLP over the flattened concatenation of all modalities, the paper's
MM-IMDB gate), ``transformer`` (sequences (B, T, F) concatenated along F, for MOSEI), ``conv`` (images
(B, C, H, W) concatenated along C, after the public code's global gate), or a node with ``_target_``
for a module called with the inputs mapping that reports its width as ``num_outputs``. The built-in
gates infer their input width at the first forward (lazy layers).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusionbench.compute import count_madds
from fusionbench.errors import ConfigError
from fusionbench.fusion.base import FusionOutput, as_module_dict
from fusionbench.fusion.configs import fusion_names
from fusionbench.fusion.dynmm.config import parse_cost, parse_temperature, resolve_modalities
from fusionbench.fusion.dynmm.gates import build_gate
from fusionbench.fusion.dynmm.routing import (
    anneal_temperature,
    gumbel_softmax_st,
    resource_loss,
    softmax_st,
    take,
)
from fusionbench.fusion.dynmm.stage1 import load_stage1
from fusionbench.fusion.profusion.model import build_base

log = logging.getLogger("fusionbench")

GATINGS = ("gumbel", "softmax", "soft")
EXPERT_KEYS = ("fusion", "modalities", "args")


# -- helpers ---------------------------------------------------------------------------------------
def _inside_flop_counter() -> bool:
    """True inside a dispatch mode (`count_madds` of the whole model): counting there would nest."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # pragma: no cover - older torch
        return False
    return len(_get_current_dispatch_mode_stack()) > 0


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class DynMMFusion(nn.Module):
    """Args:
    encoders: one encoder per modality; each expert gets deep copies of those it uses.
    num_outputs: classes / labels / targets (every expert's width).
    experts: ``{name: {fusion: <fusion config name | node with _target_>, modalities: [...] | all,
        args: {overrides}}}``, at least two, in a fixed order (the gate's output order).
    gate: ``mlp`` | ``transformer`` | ``conv`` | a node with ``_target_`` (module called with the
        inputs mapping, reporting ``num_outputs``).
    gate_args: keyword arguments of a built-in gate (e.g. ``{hidden: [128]}`` for ``mlp``).
    gating: ``gumbel`` (paper) | ``softmax`` (public code) | ``soft`` (DynMM-d).
    temperature: τ, a number or ``{start, end, anneal_epochs, schedule: exp|linear}`` (annealed from
        the first stage-II epoch by the callback).
    resource_weight: λ of eq. 3 (>= 0).
    cost: ``madds`` | ``share`` | ``{expert: cost}`` (see the module docstring).
    stage1_epochs: epochs of stage I (expert pre-training) before the gate is trained.
    freeze_experts: freeze the experts in stage II (otherwise fine-tuned with the gate).
    stage1_ckpt: a ``.ckpt`` of an earlier DynMM run (its experts are loaded), or ``{expert: .ckpt of
        that expert's own run}``; stage I is skipped. A path may be a file-name pattern that matches
        exactly one file (``.../checkpoints/epoch*.ckpt``: the run's selected checkpoint).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_outputs: int,
        experts: Mapping[str, Mapping[str, Any]],
        gate: str | Mapping[str, Any] = "mlp",
        gate_args: Mapping[str, Any] | None = None,
        gating: str = "gumbel",
        temperature: float | Mapping[str, Any] = 1.0,
        resource_weight: float = 0.0,
        cost: str | Mapping[str, float] = "madds",
        stage1_epochs: int = 0,
        freeze_experts: bool = False,
        stage1_ckpt: str | Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        encoders = as_module_dict(encoders)
        self.modalities = sorted(encoders.keys())
        self.num_outputs = int(num_outputs)
        if gating not in GATINGS:
            raise ConfigError(f"fusion.gating must be one of {GATINGS}, got {gating!r}.")
        self.gating = gating
        if resource_weight < 0:
            raise ConfigError(
                f"fusion.resource_weight (λ of the resource loss) must be >= 0, got {resource_weight}; a "
                "negative λ would reward computation. Use 0 to train for accuracy alone."
            )
        self.resource_weight = float(resource_weight)
        if int(stage1_epochs) < 0:
            raise ConfigError(f"fusion.stage1_epochs must be >= 0, got {stage1_epochs}.")
        self.stage1_epochs = int(stage1_epochs)
        self.freeze_experts = bool(freeze_experts)
        self.temperature_schedule = parse_temperature(temperature)

        # experts
        experts = _plain(experts)
        if not isinstance(experts, Mapping) or len(experts) < 2:
            raise ConfigError(
                "fusion.experts needs at least two experts, "
                "{name: {fusion: <config name or node>, modalities: [...]}}; "
                f"got {experts!r}."
            )
        self.expert_names = list(experts)
        self.expert_modalities: dict[str, list[str]] = {}
        built = {}
        for name, spec in experts.items():
            built[name] = self._build_expert(str(name), spec, encoders)
        self.experts = nn.ModuleDict(built)
        self._check_widths()

        # gate
        self.gate = build_gate(gate, _plain(gate_args) or {}, self.modalities, self.expert_names)

        # costs
        n = len(self.expert_names)
        self.cost_form, self._fixed_costs = parse_cost(_plain(cost), self.expert_names)
        self.register_buffer("expert_madds", torch.zeros(n, dtype=torch.long))
        self.register_buffer("gate_madds", torch.zeros((), dtype=torch.long))
        self.register_buffer("costs_measured", torch.zeros((), dtype=torch.bool))

        # stages
        self.stage1_loaded = False
        if stage1_ckpt:
            self.load_stage1(_plain(stage1_ckpt))
            self.stage1_loaded = True
        elif self.stage1_epochs == 0 and self.freeze_experts:
            raise ConfigError(
                "fusion.freeze_experts=true with fusion.stage1_epochs=0 and no fusion.stage1_ckpt would "
                "freeze randomly initialised experts. Pre-train them (fusion.stage1_epochs=N), load them "
                "(fusion.stage1_ckpt=PATH), or set fusion.freeze_experts=false."
            )
        self.register_buffer("stage", torch.tensor(2 if self.stage1_loaded or self.stage1_epochs == 0 else 1))
        self.register_buffer("temperature", torch.tensor(self.temperature_schedule["start"]))
        self._task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.driven = False  # set by DynMMCallback
        self._warned = False
        self._frozen_applied: bool | None = None
        self._apply_freeze()

    # -- construction ------------------------------------------------------------------------------
    def _build_expert(self, name: str, spec: Any, encoders: nn.ModuleDict) -> nn.Module:
        if not name or "." in name:
            raise ConfigError(
                f"fusion.experts: expert names must be non-empty and without dots, got {name!r}."
            )
        if callable(spec) or isinstance(spec, str):
            spec = {"fusion": spec}
        if not isinstance(spec, Mapping) or "fusion" not in spec:
            raise ConfigError(
                f"fusion.experts.{name} needs a `fusion` (a fusion config name or a node with _target_), got "
                f"{spec!r}."
            )
        unknown = sorted(set(spec) - set(EXPERT_KEYS))
        if unknown:
            raise ConfigError(
                f"fusion.experts.{name} has unknown keys {unknown}; an expert takes {list(EXPERT_KEYS)}."
            )
        fusion = spec["fusion"]
        if isinstance(fusion, str):
            names = fusion_names(exclude=("dynmm", "profusion"))
            if fusion not in names:
                raise ConfigError(
                    f"fusion.experts.{name}.fusion={fusion!r} is not a fusion DynMM can use as an expert; "
                    f"choose one of {names}."
                )
        mods = resolve_modalities(name, spec.get("modalities"), self.modalities)
        self.expert_modalities[name] = mods
        own = nn.ModuleDict({m: copy.deepcopy(encoders[m]) for m in mods})
        try:
            expert = build_base(fusion, own, self.num_outputs, spec.get("args") or {})
        except ConfigError as exc:
            raise ConfigError(f"DynMM expert '{name}' (modalities {mods}): {exc}") from exc
        if not callable(getattr(expert, "forward", None)):
            raise ConfigError(f"DynMM expert '{name}' built a {type(expert).__name__}, not a fusion model.")
        return expert

    def _check_widths(self) -> None:
        widths = {n: getattr(e, "num_outputs", self.num_outputs) for n, e in self.experts.items()}
        first = self.expert_names[0]
        for n, w in widths.items():
            if int(w) != int(widths[first]):
                raise ConfigError(
                    f"DynMM experts must predict the same outputs: expert '{first}' has {widths[first]} "
                    f"outputs and expert '{n}' has {w}. Drop `num_outputs` from the experts' args."
                )

    # -- stage I checkpoints (`fusionbench.fusion.dynmm.stage1`) --------------------------------------
    def load_stage1(self, source: str | Mapping[str, str]) -> None:
        """Load the experts' weights (see ``stage1_ckpt``); every expert must be covered."""
        load_stage1(self, source)

    # -- stage and temperature (driven by the callback) -----------------------------------------------
    def bind_task_loss(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """The task's loss ``fn(logits, target)``; `FusionTask` binds it (stage I trains every expert on
        it)."""
        self._task_loss = fn

    def stage_at(self, epoch: int) -> int:
        return 1 if not self.stage1_loaded and epoch < self.stage1_epochs else 2

    def temperature_at(self, epoch: int) -> float:
        """τ in ``epoch``; annealing counts stage-II epochs (the gate is not trained in stage I)."""
        s = self.temperature_schedule
        k = epoch if self.stage1_loaded else epoch - self.stage1_epochs
        return anneal_temperature(max(k, 0), s["start"], s["end"], s["anneal_epochs"], s["schedule"])

    def set_epoch(self, epoch: int) -> None:
        """Stage, temperature and freezing for training epoch ``epoch`` (0-based)."""
        self.stage.fill_(self.stage_at(epoch))
        self.temperature.fill_(self.temperature_at(epoch))
        self._apply_freeze()

    @property
    def experts_frozen(self) -> bool:
        return self.freeze_experts and int(self.stage) == 2

    def _apply_freeze(self) -> None:
        frozen = self.experts_frozen
        if frozen == self._frozen_applied:
            return
        for p in self.experts.parameters():
            p.requires_grad_(not frozen)
        self._frozen_applied = frozen
        if frozen:
            self.experts.eval()
        elif self.training:
            self.experts.train()

    def train(self, mode: bool = True) -> DynMMFusion:
        super().train(mode)
        if mode and self.experts_frozen:
            self.experts.eval()  # frozen: fixed functions, running statistics included
        return self

    # -- costs ---------------------------------------------------------------------------------------
    def expert_inputs(self, inputs: Mapping[str, Any], name: str) -> dict[str, Any]:
        return {m: inputs[m] for m in self.expert_modalities[name]}

    def measure_costs(self, inputs: Mapping[str, Any]) -> None:
        """Each expert's and the gate's MAdds at batch 1 on the first sample of ``inputs``."""
        first = take(dict(inputs), slice(0, 1))
        madds = [count_madds(self.experts[n], self.expert_inputs(first, n)).madds for n in self.expert_names]
        self.expert_madds.copy_(torch.tensor(madds, dtype=torch.long))
        self.gate_madds.fill_(count_madds(self.gate, first).madds)
        self.costs_measured.fill_(True)

    def costs(self) -> torch.Tensor:
        """C_i of eq. 3, (experts,) float."""
        if self._fixed_costs is not None:
            return self._fixed_costs.to(self.expert_madds.device)
        madds = self.expert_madds.double()
        top = madds.max()
        return (madds / top if top > 0 else madds).float()

    # -- forward -------------------------------------------------------------------------------------
    def _check_shape(self, shapes: dict[str, tuple[int, ...]]) -> None:
        items = list(shapes.items())
        for name, shape in items[1:]:
            if shape != items[0][1]:
                raise ConfigError(
                    f"DynMM experts must predict the same output shape: expert '{items[0][0]}' gives "
                    f"{items[0][1]} per sample and expert '{name}' gives {shape}."
                )

    def _run_all(self, inputs: Mapping[str, Any]) -> dict[str, FusionOutput]:
        outs = {}
        for n in self.expert_names:
            if self.experts_frozen:
                with torch.no_grad():
                    outs[n] = self.experts[n](self.expert_inputs(inputs, n))
            else:
                outs[n] = self.experts[n](self.expert_inputs(inputs, n))
        self._check_shape({n: tuple(o.logits.shape[1:]) for n, o in outs.items()})
        return outs

    def _route(self, inputs: Mapping[str, Any], index: torch.Tensor) -> torch.Tensor:
        """Hard routing: every expert runs on the samples routed to it only; outputs scattered back."""
        batch = index.shape[0]
        logits, shapes = None, {}
        for i, n in enumerate(self.expert_names):
            rows = (index == i).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            out = self.experts[n](self.expert_inputs(take(dict(inputs), rows), n)).logits
            shapes[n] = tuple(out.shape[1:])
            self._check_shape(shapes)
            if logits is None:
                logits = out.new_zeros((batch, *out.shape[1:]))
            logits = logits.index_copy(0, rows, out)
        assert logits is not None
        return logits

    @staticmethod
    def _mix(g: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(logits, dim=1)  # (B, experts, ...)
        return (g.reshape(*g.shape, *([1] * (stacked.dim() - 2))).to(stacked.dtype) * stacked).sum(dim=1)

    def forward(self, inputs: Mapping[str, Any]) -> FusionOutput:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ConfigError(
                f"The batch has modalities {sorted(inputs)} but DynMM needs {self.modalities} (missing "
                f"{missing})."
            )
        self._apply_freeze()
        if self.training and not self.driven and not self._warned:
            self._warned = True
            log.warning(
                "DynMM is training without fusionbench.fusion.dynmm.callback.DynMMCallback: it stays in "
                "stage %d at temperature %.3g. Add +callbacks.dynmm={_target_: "
                "fusionbench.fusion.dynmm.callback.DynMMCallback}.",
                int(self.stage),
                float(self.temperature),
            )
        stage = int(self.stage)
        tau = float(self.temperature)
        if stage == 1:
            with torch.no_grad():
                gate_logits = self.gate(inputs)
        else:
            gate_logits = self.gate(inputs)
        if not bool(self.costs_measured) and not _inside_flop_counter():
            self.measure_costs(inputs)
        costs = self.costs().to(gate_logits.device)
        n = len(self.expert_names)
        info: dict[str, Any] = {"dynmm/stage": float(stage), "dynmm/temperature": tau}
        extras: dict[str, Any] = {}
        aux_loss = None
        all_ran = True

        if stage == 1:  # pre-training: every expert on its own loss; the output is their uniform mixture
            outs = self._run_all(inputs)
            logits = torch.stack([o.logits for o in outs.values()], dim=0).mean(dim=0).detach()
            g = F.one_hot(gate_logits.argmax(dim=-1), n).to(logits.dtype)
            extras["dynmm_expert_outputs"] = outs
            own = [o.aux_loss for o in outs.values() if o.aux_loss is not None]
            aux_loss = torch.stack([a.reshape(()) for a in own]).sum() if own else None
        elif self.gating == "soft":
            g = F.softmax(gate_logits / tau, dim=-1)
            outs = self._run_all(inputs)
            logits = self._mix(g, [o.logits for o in outs.values()])
        elif self.training:
            g, _ = (
                gumbel_softmax_st(gate_logits, tau)
                if self.gating == "gumbel"
                else softmax_st(gate_logits, tau)
            )
            outs = self._run_all(inputs)
            logits = self._mix(g, [o.logits for o in outs.values()])
        else:
            index = gate_logits.argmax(dim=-1)
            g = F.one_hot(index, n).to(gate_logits.dtype)
            logits = self._route(inputs, index)
            outs, all_ran = {}, False

        if stage == 2:
            resource = resource_loss(g, costs)
            aux_loss = self.resource_weight * resource
            if all_ran and not self.experts_frozen:
                own = [o.aux_loss.reshape(()) for o in outs.values() if o.aux_loss is not None]
                if own:
                    aux_loss = aux_loss + torch.stack(own).sum()
            info["dynmm/resource"] = resource.detach()

        share = g.detach().float().mean(dim=0)
        for i, name in enumerate(self.expert_names):
            info[f"dynmm/share_{name}"] = share[i]
        gate_madds = float(self.gate_madds)
        madds = self.expert_madds.to(share.device).double()
        every = stage == 1 or self.gating == "soft"
        info["dynmm/madds"] = (madds.sum() if every else (share.double() * madds).sum()).float() + gate_madds
        info["dynmm/gate_madds"] = gate_madds
        if all_ran:
            for name, o in outs.items():
                for key, value in o.info.items():
                    info[f"{name}/{key}"] = value
        return FusionOutput(logits, aux_loss, info, extras or None)

    def target_loss(self, output: FusionOutput, target: torch.Tensor) -> torch.Tensor:
        """Stage I: Σ_i L_task(E_i) (+ each expert's own ``target_loss``); stage II: 0 (the task's loss on
        the gated output is the whole task term)."""
        outs = (output.extras or {}).get("dynmm_expert_outputs")
        if not outs:
            return output.logits.new_zeros(())
        if self._task_loss is None:
            raise ConfigError(
                "DynMM's stage I needs the task's loss; train it through fusionbench.task.FusionTask, or "
                "call model.bind_task_loss(fn) first."
            )
        total = output.logits.new_zeros(())
        for name, out in outs.items():
            total = total + self._task_loss(out.logits, target)
            expert = self.experts[name]
            if hasattr(expert, "target_loss"):
                total = total + expert.target_loss(out, target)
        return total
