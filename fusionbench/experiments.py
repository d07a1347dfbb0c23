"""Experiments as rows of the results tables.

A table spec (``configs/tables/<table>.yaml``) declares each of its rows as a recipe, a config of
``configs/experiment/``, plus Hydra overrides::

    recipe: pro_stocks                      # the table's default recipe
    rows:
      - {label: MulT, experiment: pro_t4_fnb_mult_base, overrides: [fusion=mult, trainer.max_epochs=4]}

The row's ``experiment`` is its name: the experiment name its runs are filed under
(``results/runs/<name>/seed=<s>``) and the option of ``python train.py experiment=<name>``: `register` (run
when ``fusionbench.train`` is imported) adds a Hydra config source that serves every row as
``experiment/<name>`` (package ``_global_``), the recipe with the overrides applied and
``experiment_name: <name>`` (``python -m fusionbench.experiments`` lists them).

A row without ``recipe`` or ``overrides`` names an experiment declared elsewhere (a file of
``configs/experiment/`` or a row of another table) and reuses its runs; a configuration is declared once.
In a curve table (``kind: curve``) ``{x}`` in a row's name and overrides stands for each of the table's
``x.values`` (one experiment per point, except the points of ``reuse: {x: <experiment>}``, which are
another row's configuration), and a curve row's ``baseline`` may be declared the same way.
Overrides are Hydra's ``key=value`` syntax. A config group choice (``fusion=mult``) replaces the recipe's
``override /<group>`` default and, when it differs from the recipe's choice, drops the recipe's settings of
that group's node (they were written for the recipe's choice: ``fusion.head_hidden`` of a concat recipe means
nothing to ``fusion=profusion``); a value (``trainer.max_epochs=4``) merges into the recipe's body as a
command-line override would.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from fusionbench import ROOT
from fusionbench.errors import ConfigError

CONFIG_DIR = ROOT / "configs"
GROUP = "experiment"
_PARSER = OverridesParser.create()


@dataclass(frozen=True)
class Row:
    """One experiment a table declares: ``recipe`` with ``overrides``, filed as ``name``."""

    name: str
    recipe: str
    overrides: tuple[str, ...]
    table: str


def _flatten(items: Iterable[Any]) -> Iterator[str]:
    """Override lists may hold lists (YAML aliases of shared override lists): spliced in order."""
    for item in items:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield str(item)


def _declared(entry: dict[str, Any], table: str, default_recipe: str | None, where: str) -> Row | None:
    """The row ``entry`` declares, or None when it only names an experiment declared elsewhere."""
    if "recipe" not in entry and "overrides" not in entry:
        return None
    recipe = entry.get("recipe", default_recipe)
    if not recipe:
        raise ConfigError(
            f"{where}: row {entry.get('experiment')!r} has overrides but no recipe; give it `recipe: <config "
            "of configs/experiment/>` or the table a default `recipe:`."
        )
    return Row(str(entry["experiment"]), str(recipe), tuple(_flatten(entry.get("overrides") or [])), table)


def _expand(row: Row, xs: list[Any] | None, reuse: dict[Any, str], where: str) -> list[Row]:
    """A curve row's experiment per swept value, except the values it ``reuse``s from another row."""
    if not any("{x}" in t for t in (row.name, *row.overrides)):
        return [row]
    if xs is None:
        raise ConfigError(
            f"{where}: row {row.name!r} uses {{x}}, which only a curve table's `x.values` can fill."
        )
    return [
        Row(
            row.name.replace("{x}", str(x)),
            row.recipe,
            tuple(o.replace("{x}", str(x)) for o in row.overrides),
            row.table,
        )
        for x in xs
        if x not in reuse
    ]


def table_rows(config_dir: Path = CONFIG_DIR) -> dict[str, Row]:
    """Every experiment the table specs under ``config_dir/tables`` declare, by name (checked: a name is
    declared once, two names are never the same recipe and overrides, recipes exist)."""
    rows: dict[str, Row] = {}
    by_definition: dict[tuple[str, tuple[str, ...]], Row] = {}
    recipes = {p.stem for p in (config_dir / GROUP).glob("*.yaml")}
    for path in sorted((config_dir / "tables").glob("*.yaml")):
        spec = _load(path)
        where = f"configs/tables/{path.name}"
        xs = (spec.get("x") or {}).get("values") if spec.get("kind") == "curve" else None
        for entry in spec.get("rows") or []:
            entries = [(entry, entry.get("reuse") or {})]
            if isinstance(entry.get("baseline"), dict):
                entries.append((entry["baseline"], {}))
            for e, reuse in entries:
                row = _declared(e, path.stem, spec.get("recipe"), where)
                for r in _expand(row, xs, reuse, where) if row else []:
                    if r.recipe not in recipes:
                        raise ConfigError(
                            f"{where}: row {r.name!r} names recipe {r.recipe!r}, which is not a config in "
                            f"configs/experiment/ (recipes: {sorted(recipes)})."
                        )
                    if r.name in recipes:
                        raise ConfigError(
                            f"{where}: row {r.name!r} has the name of the file "
                            f"configs/experiment/{r.name}.yaml; rename the row or delete the file, so the "
                            "name means one configuration."
                        )
                    key = (r.recipe, tuple(sorted(r.overrides)))
                    if r.name in rows and (rows[r.name].recipe, tuple(sorted(rows[r.name].overrides))) != key:
                        raise ConfigError(
                            f"{where}: row {r.name!r} is declared again with a different recipe or overrides "
                            f"(first in configs/tables/{rows[r.name].table}.yaml); give one of them another "
                            "name."
                        )
                    if key in by_definition and by_definition[key].name != r.name:
                        twin = by_definition[key]
                        raise ConfigError(
                            f"{where}: rows {twin.name!r} (configs/tables/{twin.table}.yaml) and {r.name!r} "
                            f"are the same configuration; name {twin.name!r} in both tables so they share "
                            "its runs."
                        )
                    rows.setdefault(r.name, r)
                    by_definition.setdefault(key, r)
    return rows


def _load(path: Path) -> dict[str, Any]:
    # libyaml when present: the specs and recipes are read at every start of train.py
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader) or {}


def _merge(node: dict[str, Any], dotted: str, value: Any) -> None:
    """``node[dotted] = value``, merging mappings into mappings (OmegaConf.update's ``merge=True``)."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            _merge(node[leaf], str(k), v)
    else:
        node[leaf] = copy.deepcopy(value)


def row_node(row: Row, config_dir: Path = CONFIG_DIR, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment config of ``row``: its recipe with the overrides applied (unresolved)."""
    node = copy.deepcopy(recipe if recipe is not None else _load(config_dir / GROUP / f"{row.recipe}.yaml"))
    defaults = list(node.pop("defaults", None) or [])
    try:
        overrides = _PARSER.parse_overrides(list(row.overrides))
    except HydraException as exc:
        raise ConfigError(f"configs/tables/{row.table}.yaml, row {row.name!r}: {exc}") from exc
    for o in overrides:
        if o.is_sweep_override() or o.is_delete() or o.package is not None:
            raise ConfigError(
                f"configs/tables/{row.table}.yaml, row {row.name!r}: {o.input_line!r} is not a plain "
                "`key=value` override; a row is one configuration (sweeps belong to the table's command)."
            )
    is_group = [isinstance(o.value(), str) and (config_dir / o.key_or_group).is_dir() for o in overrides]
    # group choices first, so that a choice never drops a value the row sets
    for group, o in sorted(zip(is_group, overrides, strict=True), key=lambda pair: not pair[0]):
        value = o.value()
        if group:
            key = f"override /{o.key_or_group}"
            hit = [i for i, d in enumerate(defaults) if isinstance(d, dict) and key in d]
            if not (hit and defaults[hit[0]][key] == value):
                node.pop(o.key_or_group.replace("/", "."), None)  # the recipe's settings of its own choice
            if hit:
                defaults[hit[0]] = {key: value}
            else:
                defaults.append({key: value})
        else:
            _merge(node, o.key_or_group, value)
    node["experiment_name"] = row.name
    if defaults:
        node["defaults"] = defaults
    return node


_ROWS: dict[str, dict[str, Row]] = {}  # per configs folder, read once per process
_RECIPES: dict[tuple[str, str], dict[str, Any]] = {}


def rows(config_dir: Path = CONFIG_DIR) -> dict[str, Row]:
    """`table_rows`, cached."""
    key = str(config_dir)
    if key not in _ROWS:
        _ROWS[key] = table_rows(config_dir)
    return _ROWS[key]


class TableRowsSource(ConfigSource):
    """Hydra config source serving each table row as the config ``experiment/<row>``. Rows are listed from the
    table specs once and built only when composed: Hydra deep-copies every source for each composition, and
    this one holds nothing but its path."""

    @staticmethod
    def scheme() -> str:
        return "fbrows"

    def _rows(self) -> dict[str, Row]:
        return rows(Path(self.path))

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._normalize_file_name(config_path).removeprefix(f"{GROUP}/").removesuffix(".yaml")
        row = self._rows().get(name)
        if row is None:
            raise ConfigLoadError(f"no table row named {name!r}")
        config_dir = Path(self.path)
        key = (str(config_dir), row.recipe)
        if key not in _RECIPES:
            _RECIPES[key] = _load(config_dir / GROUP / f"{row.recipe}.yaml")
        node = OmegaConf.create(row_node(row, config_dir, _RECIPES[key]))
        return ConfigResult(
            config=node, path=self.full_path(), provider=self.provider, header={"package": "_global_"}
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", GROUP)

    def is_config(self, config_path: str) -> bool:
        group, _, name = (
            self._normalize_file_name(config_path.strip("/")).removesuffix(".yaml").rpartition("/")
        )
        return group == GROUP and name in self._rows()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        path = config_path.strip("/")
        if path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if path != GROUP or results_filter == ObjectType.GROUP:
            return []
        return sorted(self._rows())


class TableRowsSearchPath(SearchPathPlugin):
    """Puts `TableRowsSource` (fusionbench's ``configs/``) on every Hydra config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="fusionbench-rows", path=f"{TableRowsSource.scheme()}://{CONFIG_DIR}")


def register() -> None:
    """Make every table row an ``experiment=<row>`` option of any Hydra composition in this process."""
    plugins = Plugins.instance()
    plugins.register(TableRowsSource)
    plugins.register(TableRowsSearchPath)


if __name__ == "__main__":  # python -m fusionbench.experiments: every row, its table, recipe and overrides
    for name, row in sorted(rows().items()):
        print(f"{name}  [configs/tables/{row.table}.yaml]  experiment={row.recipe} {' '.join(row.overrides)}")
