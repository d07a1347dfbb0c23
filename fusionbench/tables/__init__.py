"""Turn run folders into paper tables: `collect_runs` (records -> frame), `build_tables` (frame -> files)."""

from fusionbench.tables.build import TableSpec, build_tables, update_readme
from fusionbench.tables.collect import collect_runs

__all__ = ["TableSpec", "build_tables", "collect_runs", "update_readme"]
