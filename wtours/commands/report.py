"""``wtours report RUN_DIR``: (re)write the report of a run directory, a stage's or a chain's."""

from __future__ import annotations

from typing import Any

from wtours.report import report_files, write_report


def cli_main(args: Any) -> int:
    write_report(args.run_dir)
    for path in report_files(args.run_dir):
        print(path)
    return 0
