"""Config values checked against the type hints of the constructor they are for, before anything is built.

A config node with ``_target_`` becomes ``Class(**node)``; a value of the wrong scalar type
(``fusion.f_max_iter=abc``) used to fail deep inside the model with a traceback. `check_types` compares every
scalar value with the constructor's annotation (``int``, ``float``, ``bool``, ``str`` and their unions with
``None``) and stops with one paragraph naming the key, the value and the expected type. Annotations it does
not understand (containers, modules, callables) are not checked.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fusionbench.errors import ConfigError

_SCALARS = (int, float, bool, str, type(None))


def _members(hint: Any) -> tuple[Any, ...] | None:
    """The scalar types ``hint`` allows, or None when it allows something this module does not check."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
    else:
        members = (hint,)
    return members if all(m in _SCALARS for m in members) else None


def _fits(value: Any, members: tuple[Any, ...]) -> bool:
    if isinstance(value, bool):
        return bool in members
    if isinstance(value, int):
        return int in members or float in members
    if isinstance(value, float):
        return float in members
    if value is None:
        return type(None) in members
    if isinstance(value, str):
        return str in members
    return True  # containers: not checked here


def _name(members: tuple[Any, ...]) -> str:
    return " or ".join("None" if m is type(None) else m.__name__ for m in members)


def check_types(node: DictConfig | None, where: str) -> None:
    """Check ``node`` (and its children with a ``_target_``) against their constructors' type hints."""
    if not isinstance(node, DictConfig):
        return
    for key, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig):
            check_types(child, f"{where}.{key}")
    target = node.get("_target_")
    if not target:
        return
    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001 - an unknown target: Hydra reports it
        return
    hints: dict[str, Any] = {}
    # base classes first: `**kwargs` constructors pass their arguments on to them
    for klass in reversed(cls.__mro__ if isinstance(cls, type) else ()):
        if "__init__" in vars(klass):
            try:
                hints.update(typing.get_type_hints(klass.__init__))
            except Exception:  # noqa: BLE001 - unresolvable hints: that class is not checked
                continue
    values = OmegaConf.to_container(node, resolve=True)
    for key, value in values.items():
        members = _members(hints.get(key))
        if key.startswith("_") or members is None or _fits(value, members):
            continue
        raise ConfigError(
            f"{where}.{key}={value!r} must be {_name(members)} (the `{key}` argument of {cls.__name__}). "
            f"Give a {_name(members)} value, e.g. `{where}.{key}=...` on the command line; "
            "`python train.py --cfg job` prints the composed config."
        )
