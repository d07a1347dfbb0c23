"""DynMM's small config languages: the temperature schedule, an expert's modalities and the resource cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fusionbench.errors import ConfigError

SCHEDULES = ("exp", "linear")
COSTS = ("madds", "share")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def parse_temperature(temperature: Any) -> dict[str, Any]:
    temperature = _plain(temperature)
    if isinstance(temperature, (int, float)):
        temperature = {"start": temperature}
    if not isinstance(temperature, Mapping):
        raise ConfigError(
            "fusion.temperature must be a number or {start, end, anneal_epochs, schedule}, got "
            f"{temperature!r}."
        )
    unknown = sorted(set(temperature) - {"start", "end", "anneal_epochs", "schedule"})
    if unknown:
        raise ConfigError(
            f"fusion.temperature has unknown keys {unknown}; it takes start, end, anneal_epochs, schedule."
        )
    start = float(temperature.get("start", 1.0))
    end = temperature.get("end")
    out = {
        "start": start,
        "end": start if end is None else float(end),
        "anneal_epochs": int(temperature.get("anneal_epochs", 0) or 0),
        "schedule": str(temperature.get("schedule", "exp")),
    }
    if out["schedule"] not in SCHEDULES:
        raise ConfigError(f"fusion.temperature.schedule must be one of {SCHEDULES}, got {out['schedule']!r}.")
    if out["start"] <= 0 or out["end"] <= 0:
        raise ConfigError(
            f"fusion.temperature start and end must be > 0, got {out['start']} and {out['end']}."
        )
    if out["anneal_epochs"] < 0:
        raise ConfigError(f"fusion.temperature.anneal_epochs must be >= 0, got {out['anneal_epochs']}.")
    return out


def resolve_modalities(name: str, given: Any, modalities: Sequence[str]) -> list[str]:
    """An expert's modalities: names or positions in the sorted list, or ``all``."""
    if given is None or given == "all":
        return list(list(modalities))
    if isinstance(given, (str, int)):
        given = [given]
    out = []
    for m in given:
        if isinstance(m, bool) or not isinstance(m, (str, int)):
            raise ConfigError(f"fusion.experts.{name}.modalities: entries are names or positions, got {m!r}.")
        if isinstance(m, int):
            if not -len(list(modalities)) <= m < len(list(modalities)):
                raise ConfigError(
                    f"fusion.experts.{name}.modalities: position {m} is out of range for the modalities "
                    f"{list(modalities)}."
                )
            m = list(modalities)[m]
        if m not in list(modalities):
            raise ConfigError(
                f"fusion.experts.{name}.modalities: '{m}' is not among the modalities {list(modalities)}."
            )
        if m not in out:
            out.append(m)
    if not out:
        raise ConfigError(f"fusion.experts.{name}.modalities is empty; list at least one modality, or `all`.")
    return sorted(out)


def parse_cost(cost: Any, expert_names: Sequence[str]) -> tuple[str, torch.Tensor | None]:
    """``(form, fixed costs or None)`` of ``fusion.cost``: ``madds`` (measured later), ``share`` or ``{expert:
    cost}``."""
    if isinstance(cost, str):
        if cost not in COSTS:
            raise ConfigError(f"fusion.cost must be one of {COSTS} or {{expert: cost}}, got {cost!r}.")
        if cost == "share":
            fixed = torch.zeros(len(list(expert_names)))
            fixed[-1] = 1.0
            return "share", fixed
        return "madds", None
    if isinstance(cost, Mapping):
        missing = [n for n in list(expert_names) if n not in cost]
        unknown = sorted(set(cost) - set(list(expert_names)))
        if missing or unknown:
            raise ConfigError(
                f"fusion.cost as a mapping needs one cost per expert {list(expert_names)}; missing "
                f"{missing}, unknown {unknown}."
            )
        values = [float(cost[n]) for n in list(expert_names)]
        if any(v < 0 for v in values):
            raise ConfigError(f"fusion.cost values must be >= 0, got {dict(cost)}.")
        return "fixed", torch.tensor(values)
    raise ConfigError(f"fusion.cost must be one of {COSTS} or {{expert: cost}}, got {cost!r}.")
