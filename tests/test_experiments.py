"""Experiments as table rows (fusionbench/experiments.py): what a row composes to, the checks on table specs,
and that every row of the shipped tables is an `experiment=<row>` option declared once."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from fusionbench import ROOT
from fusionbench.errors import ConfigError
from fusionbench.experiments import Row, row_node, rows, table_rows

CONFIGS = ROOT / "configs"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


RECIPE = """\
    # @package _global_
    defaults:
      - override /fusion: concat
      - override /optimizer: sgd
    experiment_name: demo
    fusion: {head_hidden: [100]}
    optimizer: {lr: 0.1, momentum: 0.0}
    trainer: {max_epochs: 3}
    """


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A configs folder with the groups a row may choose, one recipe and no tables yet."""
    return write(
        tmp_path / "configs",
        {
            "experiment/demo.yaml": RECIPE,
            "fusion/concat.yaml": "head_hidden: []\n",
            "fusion/profusion.yaml": "base: concat\n",
            "optimizer/sgd.yaml": "lr: 0.01\n",
            "optimizer/adam.yaml": "lr: 0.001\n",
            "tables/.keep": "",
        },
    )


def table(config_dir: Path, name: str, spec: dict) -> None:
    (config_dir / "tables" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def test_a_value_override_merges_into_the_recipe_and_names_the_row(config_dir):
    node = row_node(
        Row("demo_b", "demo", ("trainer.max_epochs=5", "fusion.head_hidden=[64,32]"), "t"), config_dir
    )
    assert node["experiment_name"] == "demo_b"
    assert node["trainer"] == {"max_epochs": 5}
    assert node["fusion"] == {"head_hidden": [64, 32]}
    assert node["optimizer"] == {"lr": 0.1, "momentum": 0.0}  # untouched
    assert node["defaults"] == [{"override /fusion": "concat"}, {"override /optimizer": "sgd"}]


def test_a_mapping_value_merges_key_by_key_like_a_command_line_override(config_dir):
    node = row_node(Row("r", "demo", ("optimizer={lr: 0.5}",), "t"), config_dir)
    assert node["optimizer"] == {"lr": 0.5, "momentum": 0.0}


def test_a_group_choice_replaces_the_recipes_choice_and_its_settings(config_dir):
    """fusion.head_hidden was written for concat; it must not reach ProFusion's constructor."""
    node = row_node(
        Row(
            "r", "demo", ("fusion.base_args={head_hidden: [100]}", "fusion=profusion", "optimizer=adam"), "t"
        ),
        config_dir,
    )
    assert node["defaults"] == [{"override /fusion": "profusion"}, {"override /optimizer": "adam"}]
    # the value set after the choice survives (choices are applied first, whatever the order in the row)
    assert node["fusion"] == {"base_args": {"head_hidden": [100]}}
    assert "optimizer" not in node  # sgd's momentum would be an unexpected argument of Adam
    # choosing the recipe's own choice keeps its settings
    same = row_node(Row("r", "demo", ("fusion=concat",), "t"), config_dir)
    assert same["fusion"] == {"head_hidden": [100]}


def test_a_group_the_recipe_does_not_override_is_appended(config_dir):
    write(config_dir, {"dataset/a.yaml": "x: 1\n"})
    node = row_node(Row("r", "demo", ("dataset=a",), "t"), config_dir)
    assert node["defaults"][-1] == {"override /dataset": "a"}


@pytest.mark.parametrize("override", ["trainer.max_epochs=1,2", "~trainer", "fusion@foo=concat"])
def test_a_row_is_one_plain_configuration(config_dir, override):
    with pytest.raises(ConfigError, match="not a plain `key=value` override"):
        row_node(Row("r", "demo", (override,), "t"), config_dir)


def test_an_unparsable_override_names_the_table_and_row(config_dir):
    with pytest.raises(ConfigError, match=r"configs/tables/t.yaml, row 'r'"):
        row_node(Row("r", "demo", ("trainer.max_epochs=[1",), "t"), config_dir)


def test_rows_take_the_tables_recipe_and_references_declare_nothing(config_dir):
    table(
        config_dir,
        "t1",
        {
            "recipe": "demo",
            "rows": [
                {"label": "a", "experiment": "demo_a", "overrides": []},
                {"label": "b", "experiment": "demo_b", "overrides": ["trainer.max_epochs=5"]},
                {"label": "x", "experiment": "elsewhere"},  # a reference: declared by another table or a file
            ],
        },
    )
    found = table_rows(config_dir)
    assert sorted(found) == ["demo_a", "demo_b"]
    assert found["demo_b"] == Row("demo_b", "demo", ("trainer.max_epochs=5",), "t1")


def test_curve_rows_expand_over_x_except_reused_points_and_declare_baselines(config_dir):
    table(
        config_dir,
        "fig",
        {
            "kind": "curve",
            "recipe": "demo",
            "x": {"values": [1, 2, 3]},
            "rows": [
                {
                    "label": "c",
                    "experiment": "demo_r{x}",
                    "overrides": ["trainer.max_epochs={x}"],
                    "reuse": {2: "demo_two"},
                    "baseline": {"experiment": "demo_base{x}", "overrides": ["optimizer.lr={x}"]},
                }
            ],
        },
    )
    table(
        config_dir,
        "t",
        {"recipe": "demo", "rows": [{"label": "2", "experiment": "demo_two", "overrides": []}]},
    )
    found = table_rows(config_dir)
    assert sorted(found) == ["demo_base1", "demo_base2", "demo_base3", "demo_r1", "demo_r3", "demo_two"]
    assert found["demo_r3"].overrides == ("trainer.max_epochs=3",)
    assert found["demo_base2"].overrides == ("optimizer.lr=2",)


def test_x_outside_a_curve_table_is_an_error(config_dir):
    table(
        config_dir,
        "t",
        {"recipe": "demo", "rows": [{"label": "a", "experiment": "demo_{x}", "overrides": []}]},
    )
    with pytest.raises(ConfigError, match=r"only a curve table's `x.values`"):
        table_rows(config_dir)


@pytest.mark.parametrize(
    "rows_, message",
    [
        (
            [{"label": "a", "experiment": "a", "overrides": [], "recipe": "nope"}],
            r"recipe 'nope', which is not a config",
        ),
        (
            [{"label": "a", "experiment": "demo", "overrides": ["trainer.max_epochs=1"]}],
            r"has the name of the file",
        ),
        (
            [
                {"label": "a", "experiment": "a", "overrides": ["trainer.max_epochs=1"]},
                {"label": "b", "experiment": "a", "overrides": ["trainer.max_epochs=2"]},
            ],
            r"row 'a' is declared again with a different recipe or overrides",
        ),
        (
            [
                {"label": "a", "experiment": "a", "overrides": ["trainer.max_epochs=1", "optimizer.lr=1"]},
                {"label": "b", "experiment": "b", "overrides": ["optimizer.lr=1", "trainer.max_epochs=1"]},
            ],
            r"rows 'a' .* and 'b' are the same configuration; name 'a' in both tables",
        ),
    ],
)
def test_bad_table_rows_are_explained(config_dir, rows_, message):
    table(config_dir, "t", {"recipe": "demo", "rows": rows_})
    with pytest.raises(ConfigError, match=message):
        table_rows(config_dir)


def test_overrides_without_a_recipe_are_an_error(config_dir):
    table(
        config_dir, "t", {"rows": [{"label": "a", "experiment": "a", "overrides": ["trainer.max_epochs=1"]}]}
    )
    with pytest.raises(ConfigError, match="has overrides but no recipe"):
        table_rows(config_dir)


def test_yaml_aliases_of_shared_override_lists_are_spliced(config_dir):
    (config_dir / "tables" / "t.yaml").write_text(
        "recipe: demo\nrows:\n"
        "  - {label: a, experiment: a, overrides: &pro [fusion=profusion, fusion.base=concat]}\n"
        "  - {label: b, experiment: b, overrides: [*pro, trainer.max_epochs=9]}\n"
    )
    assert table_rows(config_dir)["b"].overrides == (
        "fusion=profusion",
        "fusion.base=concat",
        "trainer.max_epochs=9",
    )


# --- the shipped tables -------------------------------------------------------------------------------------


def resolved(cfg) -> dict:
    """The configuration a run would record, minus its name and tags (which do not change what is trained)."""
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = "<run>"
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("experiment_name")
    out.pop("tags", None)
    return out


def test_every_experiment_composes_names_itself_and_is_one_configuration():
    """`python train.py experiment=<name>` works for every recipe file and every table row; a row's runs are
    filed under its own name; and no two rows train the same configuration (a table that needs another
    table's configuration names that row and reuses its runs)."""
    import fusionbench.train  # noqa: F401  (registers the rows' config source and the fb.* resolvers)

    declared = rows()
    files = {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    assert len(files) <= 50, "shared recipes live once: a new row belongs in its table, not in a new file"
    GlobalHydra.instance().clear()
    seen: dict[str, str] = {}
    problems = []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("experiment")
        assert set(options) == files | set(declared)
        for name in options:
            cfg = compose(config_name="train", overrides=[f"experiment={name}"], return_hydra_config=True)
            if name in declared and cfg.experiment_name != name:
                problems.append(f"{name}: files its runs under {cfg.experiment_name}")
            if name not in declared and not str(cfg.experiment_name).startswith(name):
                problems.append(f"{name}: files its runs under {cfg.experiment_name}")
            dm = instantiate(cfg.dataset, _convert_="all")
            if not (set(dm.modalities) <= set(cfg.backbone) or "_default_" in cfg.backbone):
                problems.append(
                    f"{name}: modalities {dm.modalities} without an encoder in {sorted(cfg.backbone)}"
                )
            if name in declared:
                key = json.dumps(resolved(cfg), sort_keys=True, default=str)
                if key in seen:
                    problems.append(f"{name} and {seen[key]} are the same configuration")
                seen[key] = name
    GlobalHydra.instance().clear()
    assert not problems, "\n".join(problems)


def test_every_table_row_names_an_experiment():
    """References (rows without overrides) point at a declared row or a recipe file, curve points and the
    paired baselines of runs tables included."""
    from fusionbench.tables.build import TableSpec

    known = set(rows()) | {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    for path in sorted((CONFIGS / "tables").glob("*.yaml")):
        spec = TableSpec.load(path)
        xs = spec.x.get("values", []) if spec.kind == "curve" and not spec.artifact else [None]
        baselines = (
            spec.baseline.values()
            if isinstance(spec.baseline, dict)
            else [spec.baseline]
            if spec.baseline
            else []
        )
        assert set(baselines) <= known, (
            f"{path.name}: baseline {spec.baseline} names an experiment nothing declares"
        )
        for row in spec.rows:
            if row.get("cited"):  # reported numbers only
                continue
            for x in xs:
                names = [
                    row["experiment"]
                    if x is None
                    else (row.get("reuse") or {}).get(x) or row["experiment"].format(x=x)
                ]
                if x is not None and spec.improvement:
                    names.append(row["baseline"].format(x=x))
                if spec.kind == "runs" and row.get("baseline"):  # the run each seed is paired with
                    names.append(row["baseline"])
                for name in names:
                    assert name in known, (
                        f"{path.name}: row {row['label']!r} names {name!r}, which nothing declares"
                    )


def test_no_table_prints_a_command_for_an_experiment_that_does_not_exist(tmp_path):
    """Every table rendered with no runs prints a command for every row; each names declared experiments
    (a glob matches at least one), existing config-group options and existing scripts."""
    import fnmatch
    import re

    import pandas as pd

    from fusionbench.tables import build_tables

    known = set(rows()) | {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    (tmp_path / "empty").mkdir()
    rendered = build_tables(CONFIGS / "tables", tmp_path / "out", tmp_path / "empty")
    assert len(rendered) == len(list((CONFIGS / "tables").glob("*.yaml")))
    checked = 0
    for name in rendered:
        text = (tmp_path / "out" / f"{name}.md").read_text()
        commands = re.findall(r"`(python [^`]+)`", text)
        assert commands, f"{name}: no command printed although no row has runs"
        for command in commands:
            words = [w.strip("'\"") for w in command.split()]
            script = words[1]
            assert (ROOT / script).is_file(), f"{name}: `{command}` runs {script}, which does not exist"
            for word in words[2:]:
                key, _, value = word.partition("=")
                if key == "experiment":
                    glob = re.fullmatch(r"glob\((.+)\)", value)
                    if glob:  # Hydra's glob(include[, exclude=...]), a pattern or a [list] each
                        include, _, exclude = glob.group(1).partition(",exclude=")
                        pick = {n for p in include.strip("[]").split(",") for n in fnmatch.filter(known, p)}
                        pick -= {
                            n for p in exclude.strip("[]").split(",") if p for n in fnmatch.filter(known, p)
                        }
                        assert pick, f"{name}: `{command}` matches nothing"
                    elif value == "<experiment>":  # the CSV's experiment column names them
                        listed = set(pd.read_csv(tmp_path / "out" / f"{name}.csv")["experiment"].dropna())
                        assert listed and listed <= known, f"{name}: undeclared {sorted(listed - known)}"
                    else:
                        assert value in known, f"{name}: `{command}` names {value!r}, which nothing declares"
                    checked += 1
                elif (CONFIGS / key).is_dir() and "." not in key:
                    assert (CONFIGS / key / f"{value}.yaml").is_file(), (
                        f"{name}: `{command}`: no {key}={value}"
                    )
    assert checked > 100
