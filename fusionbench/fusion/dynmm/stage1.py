"""DynMM stage I from an earlier run (§3.4): ``stage1_ckpt`` loads every expert from one DynMM run's
checkpoint, or each expert from a checkpoint of that expert's own run, and skips stage I."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from fusionbench.errors import ConfigError
from fusionbench.runs import checkpoint_state

if TYPE_CHECKING:
    from fusionbench.fusion.dynmm.model import DynMMFusion


def _state(path: str) -> dict[str, torch.Tensor]:
    return checkpoint_state(
        path,
        what="fusion.stage1_ckpt",
        missing_hint=(
            "Pass the .ckpt of an earlier fusion=dynmm run that trained stage I (e.g. its "
            "checkpoints/last.ckpt after fusion.stage1_epochs=N trainer.max_epochs=N), or "
            "{expert: .ckpt of that expert's own run}; or set fusion.stage1_ckpt=null to train stage I in "
            "this run."
        ),
    )


def load_stage1(model: DynMMFusion, source: str | Mapping[str, str]) -> None:
    """Load the experts' weights (see ``stage1_ckpt``); every expert must be covered."""
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - set(model.expert_names))
        missing = [n for n in model.expert_names if n not in source]
        if unknown or missing:
            raise ConfigError(
                f"fusion.stage1_ckpt as a mapping needs one checkpoint per expert {model.expert_names}; "
                f"missing {missing}, unknown {unknown}."
            )
        for name, path in source.items():
            state = _state(path)
            for prefix in (f"model.experts.{name}.", "model."):
                sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if sub:
                    break
            if not sub:
                raise ConfigError(
                    f"fusion.stage1_ckpt.{name}={path} has no weights under `model.`; pass the .ckpt of a "
                    "run of that expert's fusion alone (or of a fusion=dynmm run)."
                )
            _load_expert(model, name, sub, path)
        return
    path = str(source)
    state = _state(path)
    for prefix in ("model.experts.", "experts."):
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            break
    if not found:
        raise ConfigError(
            f"fusion.stage1_ckpt={path} holds no expert weights (no keys under model.experts.): it is not "
            "from a fusion=dynmm run. Pass the .ckpt of a DynMM run that trained stage I "
            "(fusion.stage1_epochs=N), or {expert: .ckpt of that expert's own run} to load experts "
            "trained alone."
        )
    have = sorted({k.split(".", 1)[0] for k in found})
    missing = [n for n in model.expert_names if n not in have]
    if missing:
        raise ConfigError(
            f"fusion.stage1_ckpt={path} has weights for the experts {have} but this model's experts are "
            f"{model.expert_names} (missing {missing}); declare the same experts as the stage-I run."
        )
    for name in model.expert_names:
        prefix = f"{name}."
        _load_expert(
            model, name, {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}, path
        )


def _load_expert(model: DynMMFusion, name: str, state: Mapping[str, torch.Tensor], path: str) -> None:
    try:
        model.experts[name].load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"The weights in {path} do not fit DynMM expert '{name}' (declare it with the fusion, modalities "
            f"and backbone of the run that trained it): {exc}"
        ) from exc
