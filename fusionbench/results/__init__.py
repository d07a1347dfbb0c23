"""Turn run folders into paper tables: `collect_runs` (records -> frame), `build_tables` (frame -> files)."""
from fusionbench.results.collect import collect_runs
from fusionbench.results.tables import TableSpec, build_tables, update_readme

__all__ = ["TableSpec", "build_tables", "collect_runs", "update_readme"]
