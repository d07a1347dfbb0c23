"""Fusion configs by name, as Hydra composes them, for wrappers that build other fusion models (Pro-Fusion's
base, DynMM's experts). Hydra does the composing (defaults lists, packages such as ``- deq@fusion``), so a
wrapper never reads ``configs/`` itself: inside a running ``train.py`` the app's own config search path is
used; elsewhere (tests, notebooks) fusionbench's ``configs/``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from fusionbench import ROOT
from fusionbench.errors import ConfigError


@contextmanager
def _hydra() -> Iterator[GlobalHydra]:
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance()
        return
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        yield GlobalHydra.instance()


def fusion_names(exclude: tuple[str, ...] = ()) -> list[str]:
    """The options of the ``fusion`` config group (``python train.py fusion=<name>``)."""
    with _hydra() as gh:
        return sorted(n for n in gh.config_loader().get_group_options("fusion") if n not in exclude)


def fusion_config(
    name: str, what: str = "fusion.base", user: str = "this model", exclude: tuple[str, ...] = ()
) -> DictConfig:
    """The node ``fusion=<name>`` composes to; ``what`` and ``user`` name the setting and the model in the
    error for a name that is not a fusion option (or is one of ``exclude``)."""
    names = fusion_names(exclude)
    if name not in names:
        raise ConfigError(f"{what}={name!r} is not a fusion {user} can wrap; choose one of {names}.")
    try:
        with _hydra():
            return compose(config_name="train", overrides=[f"fusion={name}"]).fusion
    except (
        MissingConfigException
    ) as exc:  # pragma: no cover - listed above, so only a broken config gets here
        raise ConfigError(f"{what}={name!r}: {exc}") from exc
