"""Render the tables declared in ``configs/tables/*.yaml`` from the run records on disk.

A table YAML names its rows (one experiment each), its columns (metric keys of the run records),
the number of seeds expected per row and, where a paper reports the row, the reported numbers.
Each table becomes ``<out>/<name>.md``, ``.csv`` and ``.tex``: mean ± sample standard deviation over
seeds with the number of runs found. A row with fewer runs than expected says so in its ``runs``
column (``3/5``), and a row without runs stays in the table with dashes and the command that makes
them. Reported numbers sit in their own columns, labelled as reported. Output is deterministic: the
same runs give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fusionbench import ROOT
from fusionbench.tables.collect import collect_runs
from fusionbench.tables.convergence import convergence_figures, convergence_markdown, convergence_rows
from fusionbench.tables.curves import curve_csv, curve_figure, curve_markdown, curve_rows
from fusionbench.tables.robustness import (
    robustness_csv,
    robustness_figure,
    robustness_markdown,
    robustness_rows,
)
from fusionbench.tables.runs import run_rows, runs_csv, runs_markdown
from fusionbench.tables.tradeoff import check_tradeoff, tradeoff_figure

DASH = "—"
README_START, README_END = "<!-- tables:start -->", "<!-- tables:end -->"


@dataclass
class Metric:
    key: str
    label: str
    scale: float = 1.0
    digits: int = 3
    spread: bool = True  # false: the mean alone (a value every seed shares, e.g. a parameter count)

    def fmt(self, value: float | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return DASH
        return f"{value * self.scale:.{self.digits}f}"


@dataclass
class TableSpec:
    name: str
    title: str
    rows: list[dict[str, Any]]
    metrics: list[Metric] = field(default_factory=list)
    kind: str = "metrics"  # or "convergence", "curve", "robustness", "runs" (tables/<kind>.py)
    steps: list[int] = field(default_factory=lambda: [1, 10, 20, 40, 100])
    trace: str = "solver_rel_residual"
    seeds: int = 5
    runs: list[str] = field(default_factory=lambda: ["results/runs"])
    command: str = "python train.py experiment={experiment} sweep=seeds"
    caption: str = ""
    reported_source: str = ""
    x: dict[str, Any] = field(default_factory=dict)  # curve tables: {label, values, log}
    improvement: bool = False  # curve tables: per-seed % improvement over each row's `baseline`
    higher_is_better: bool = False
    artifact: str = ""  # curve tables: read values from this JSON file of each run folder
    curve: str = "all"  # robustness tables: the curve (scope) of the records' `robustness` entry
    robust_metric: str = ""  # robustness tables: the metric of the noise curves (e.g. mse)
    baseline: str | dict = (
        ""  # robustness tables: experiment (or {group: experiment}) whose mean curve is b of tau
    )
    auc_digits: int = 3
    tradeoff: dict = field(
        default_factory=dict
    )  # metrics tables: metric-vs-compute and share-vs-λ figure (tables/tradeoff.py)
    history: list[str] = field(default_factory=list)  # runs tables: keys of the records' per-epoch history
    recipe: str = ""  # the rows' default recipe (fusionbench/experiments.py declares the rows as experiments)

    @classmethod
    def load(cls, path: str | Path) -> TableSpec:
        raw = yaml.safe_load(Path(path).read_text())
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        raw["metrics"] = [Metric(**m) for m in raw.get("metrics", [])]
        for row in raw[
            "rows"
        ]:  # a baseline declared in place (recipe + overrides) is named by its experiment
            if isinstance(row.get("baseline"), dict):
                row["baseline"] = row["baseline"]["experiment"]
        kind = raw.get("kind", "metrics")
        if kind not in ("metrics", "convergence", "curve", "robustness", "runs"):
            raise ValueError(
                f"{path}: kind must be 'metrics', 'convergence', 'curve', 'robustness' or 'runs', "
                f"got {kind!r}"
            )
        if kind == "runs" and (not raw["metrics"] or any(row.get("reported") for row in raw["rows"])):
            raise ValueError(
                f"{path}: a runs table needs `metrics` (the first is the one `baseline` rows pair) and has "
                "no `reported` numbers (a paper reports means: put them in the table of means)"
            )
        if raw.get("history") and kind != "runs":
            raise ValueError(f"{path}: `history` columns belong to runs tables, not kind {kind!r}")
        if kind == "robustness" and not (raw.get("robust_metric") and raw.get("baseline")):
            raise ValueError(
                f"{path}: a robustness table needs `robust_metric` (e.g. mse) "
                "and `baseline` (an experiment name)"
            )
        if kind == "curve":
            if not raw.get("x", {}).get("values") or len(raw["metrics"]) != 1:
                raise ValueError(f"{path}: a curve table needs `x: {{label, values}}` and exactly one metric")
            for row in raw["rows"]:
                if not set(row.get("at", [])) <= set(raw["x"]["values"]):
                    raise ValueError(
                        f"{path}: a curve row's `at` (the x values it has) must be among x.values "
                        f"{raw['x']['values']}: {row}"
                    )
                if raw.get("artifact"):
                    if "series" not in row:
                        raise ValueError(
                            f"{path}: rows of an artifact curve table need `series` (the key in the file): "
                            f"{row}"
                        )
                    continue
                if "{x}" not in row.get("experiment", "") or (
                    raw.get("improvement") and "{x}" not in row.get("baseline", "")
                ):
                    raise ValueError(
                        f"{path}: curve rows need `experiment` (and with improvement, `baseline`) patterns "
                        f"with {{x}}: {row}"
                    )
        for row in raw["rows"]:
            if row.get("cited"):  # a paper's row with no code behind it: its reported numbers only
                if kind != "metrics" or "label" not in row or not row.get("reported") or "experiment" in row:
                    raise ValueError(
                        f"{path}: a cited row (metrics tables only) has `label`, `reported` and no "
                        f"`experiment`, got {row}"
                    )
                continue
            if "label" not in row or "experiment" not in row:
                raise ValueError(f"{path}: every row needs `label` and `experiment`, got {row}")
        if raw.get("tradeoff"):
            if kind != "metrics":
                raise ValueError(f"{path}: `tradeoff` figures belong to metrics tables, not kind {kind!r}")
            check_tradeoff(raw["tradeoff"], [m.key for m in raw["metrics"]], raw["rows"], str(path))
        return cls(**raw)

    @property
    def has_reported(self) -> bool:
        return any(row.get("reported") for row in self.rows)


def aggregate(spec: TableSpec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per table row: n, and mean/std per metric (None where no run has it)."""
    out = []
    for row in spec.rows:
        if row.get("cited"):
            out.append(
                {
                    "label": row["label"],
                    "experiment": None,
                    "n": 0,
                    "cited": True,
                    "reported": row["reported"],
                }
                | {m.key: (None, None) for m in spec.metrics}
            )
            continue
        sel = runs[runs["experiment_name"] == row["experiment"]] if len(runs) else runs
        # seeds 0..seeds-1: a row shared with a table of more seeds averages the same runs as its own table
        if len(sel):
            sel = sel[pd.to_numeric(sel["seed"], errors="coerce") < spec.seeds]
        entry: dict[str, Any] = {
            "label": row["label"],
            "experiment": row["experiment"],
            "n": len(sel),
            "reported": row.get("reported") or {},
            "command": row.get("command") or spec.command,
        }
        converged = (
            pd.to_numeric(sel["deq_test_converged"], errors="coerce")
            if "deq_test_converged" in sel
            else pd.Series(dtype=float)
        )
        entry["unconverged"] = (
            sorted(int(s) for s in sel.loc[converged[converged < 1].index, "seed"]) if len(converged) else []
        )
        entry["early"] = early_selections(sel)
        for m in spec.metrics:
            values = (
                pd.to_numeric(sel[m.key], errors="coerce").dropna()
                if m.key in sel
                else pd.Series(dtype=float)
            )
            entry[m.key] = (
                float(values.mean()) if len(values) else None,
                float(values.std(ddof=1)) if len(values) > 1 else None,
            )
        out.append(entry)
    return out


EARLY_EPOCHS = 10  # a checkpoint selected before this epoch is named under the table (a cut-off slow start?)
UNCONVERGED = " †"


def early_selections(sel: pd.DataFrame) -> list[int]:
    """Seeds whose tested checkpoint is from before epoch EARLY_EPOCHS of a run that trained at least 3x
    longer."""
    if not len(sel) or "best_epoch" not in sel or "epochs_trained" not in sel:
        return []
    best = pd.to_numeric(sel["best_epoch"], errors="coerce")
    trained = pd.to_numeric(sel["epochs_trained"], errors="coerce")
    return sorted(int(s) for s in sel.loc[(best < EARLY_EPOCHS) & (trained >= 3 * EARLY_EPOCHS), "seed"])


def _cell(m: Metric, mean: float | None, std: float | None) -> str:
    if mean is None:
        return DASH
    return m.fmt(mean) if std is None or not m.spread else f"{m.fmt(mean)} ± {m.fmt(std)}"


def table_cells(spec: TableSpec, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "runs"] + [m.label for m in spec.metrics]
    if spec.has_reported:
        header += [f"{m.label} (reported)" for m in spec.metrics]
    body = []
    for r in rows:
        label = r["label"] + (UNCONVERGED if r.get("unconverged") else "")
        runs = "cited" if r.get("cited") else f"{r['n']}/{spec.seeds}"
        cells = [label, runs] + [_cell(m, *r[m.key]) for m in spec.metrics]
        if spec.has_reported:
            cells += [
                m.fmt(r["reported"].get(m.key)) if m.key in r["reported"] else DASH for m in spec.metrics
            ]
        body.append(cells)
    return header, body


def notes(spec: TableSpec, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Mean ± sample standard deviation over seeds; `runs` = runs found / seeds expected."]
    if spec.has_reported:
        lines.append(f"Reported columns: the numbers printed in {spec.reported_source}; not measured by us.")
    if spec.tradeoff:
        t = spec.tradeoff
        lines.append(
            f"Figure `results/{spec.name}.png`: (a) {t.get('y_label', t['y'])} against "
            f"{t.get('x_label', t['x'])} (rows with a λ as one line, other rows as single points); (b) each "
            "expert's share of the test samples against λ."
        )
    flagged = [r for r in rows if r.get("unconverged")]
    if flagged:
        lines.append(
            f"{UNCONVERGED.strip()} Tested on unconverged DEQ solves (forward residual above the failure "
            "tolerance on some test samples), averaged in as they are: "
            + "; ".join(f"{r['label']}: seeds {', '.join(map(str, r['unconverged']))}" for r in flagged)
            + "."
        )
    early = [r for r in rows if r.get("early")]
    if early:
        lines.append(
            f"Checkpoints selected before epoch {EARLY_EPOCHS} of runs that trained 3x longer: "
            + "; ".join(f"{r['label']}: seeds {', '.join(map(str, r['early']))}" for r in early)
            + "."
        )
    cited = [r["label"] for r in rows if r.get("cited")]
    if cited:
        lines.append(
            f"Cited rows ({', '.join(cited)}): the paper's numbers for methods with no code in fusionbench; "
            "nothing to run."
        )
    missing = [r for r in rows if r["n"] < spec.seeds and not r.get("cited")]
    if missing:
        lines.append(
            "Incomplete rows ("
            + ", ".join(f"{r['label']}: {r['n']}/{spec.seeds}" for r in missing)
            + "); to fill them: "
            + "; ".join(f"`{r['command'].format(experiment=r['experiment'])}`" for r in missing)
        )
    return lines


def to_markdown(spec: TableSpec, rows: list[dict[str, Any]]) -> str:
    header, body = table_cells(spec, rows)
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = [f"### {spec.title}", ""]
    if spec.caption:
        lines += [spec.caption.strip(), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(align) + " |")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    lines += [""] + notes(spec, rows)
    return "\n".join(lines) + "\n"


def to_csv(spec: TableSpec, rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["label", "experiment", "runs", "seeds_expected"]
    for m in spec.metrics:
        head += [f"{m.key}:mean", f"{m.key}:std", f"{m.key}:reported"]
    w.writerow(head)
    for r in rows:
        line = [r["label"], r["experiment"] or "cited", r["n"], spec.seeds]
        for m in spec.metrics:
            mean, std = r[m.key]
            rep = r["reported"].get(m.key)
            line += [
                "" if mean is None else f"{mean:.6g}",
                "" if std is None else f"{std:.6g}",
                "" if rep is None else f"{rep:.6g}",
            ]
        w.writerow(line)
    return buf.getvalue()


def _tex_escape(s: str) -> str:
    s = re.sub(r"([&%_#$])", r"\\\1", s)
    return s.replace("±", r"$\pm$").replace(DASH, "--")


def to_latex(spec: TableSpec, rows: list[dict[str, Any]]) -> str:
    header, body = table_cells(spec, rows)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + _tex_escape(spec.title) + "}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex_escape(c) for c in cells) + r" \\" for cells in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def build_tables(
    table_dir: str | Path = ROOT / "configs" / "tables",
    out_dir: str | Path = ROOT / "results",
    root: str | Path = ROOT,
    only: Sequence[str] | None = None,
) -> dict[str, str]:
    """Write every table's files (.md/.csv/.tex, plus .png with a `tradeoff` block; convergence tables .md and
    .png; curve and robustness tables .md/.csv/.png; runs tables .md/.csv);
    return name -> markdown."""
    out_dir, root = Path(out_dir), Path(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = {}
    for path in sorted(Path(table_dir).glob("*.yaml")):
        spec = TableSpec.load(path)
        if only and spec.name not in only:
            continue
        runs = collect_runs(root / r for r in spec.runs)
        if spec.kind == "curve":
            rows = curve_rows(spec, runs)
            md = curve_markdown(spec, rows)
            (out_dir / f"{spec.name}.md").write_text(md)
            (out_dir / f"{spec.name}.csv").write_text(curve_csv(spec, rows))
            curve_figure(spec, rows, out_dir)
            rendered[spec.name] = md
            continue
        if spec.kind == "robustness":
            rows, grid, skipped = robustness_rows(spec, runs)
            md = robustness_markdown(spec, rows, grid, skipped)
            (out_dir / f"{spec.name}.md").write_text(md)
            (out_dir / f"{spec.name}.csv").write_text(robustness_csv(spec, rows, grid))
            robustness_figure(spec, rows, grid, out_dir)
            rendered[spec.name] = md
            continue
        if spec.kind == "runs":
            rows = run_rows(spec, runs)
            md = runs_markdown(spec, rows)
            (out_dir / f"{spec.name}.md").write_text(md)
            (out_dir / f"{spec.name}.csv").write_text(runs_csv(spec, rows))
            rendered[spec.name] = md
            continue
        if spec.kind == "convergence":
            rows = convergence_rows(spec, runs)
            md = convergence_markdown(spec, rows)
            convergence_figures(spec, rows, out_dir)
            (out_dir / f"{spec.name}.md").write_text(md)
            rendered[spec.name] = md
            continue
        rows = aggregate(spec, runs)
        md = to_markdown(spec, rows)
        (out_dir / f"{spec.name}.md").write_text(md)
        (out_dir / f"{spec.name}.csv").write_text(to_csv(spec, rows))
        (out_dir / f"{spec.name}.tex").write_text(to_latex(spec, rows))
        if spec.tradeoff:
            tradeoff_figure(spec, rows, out_dir)
        rendered[spec.name] = md
    return rendered


def update_readme(readme: str | Path, rendered: dict[str, str]) -> bool:
    """Replace the block between the README markers; return whether the file changed."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block to fill")
    block = "\n".join(md for _, md in sorted(rendered.items()))
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{block}{README_END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
