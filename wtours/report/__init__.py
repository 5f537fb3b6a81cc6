"""One report writer for any run directory: :func:`write_report` renders a stage's run
(:mod:`wtours.report.stage`: ``report.md``) or a chain's (:mod:`wtours.report.chain`: ``report.md`` and a
self-contained ``report.html``), whichever ``run_dir`` holds. Used by the stage engine at the end of a run,
by the pipeline after each stage, and by ``wtours report RUN_DIR``.
"""

from __future__ import annotations

from pathlib import Path

from wtours.report.stage import plot_curve, plot_panels, read_metrics  # noqa: F401 (public here too)


def write_report(run_dir: str | Path) -> Path:
    """(Re)write ``run_dir``'s report -> the path of its ``report.md`` (a chain's ``report.html`` beside it)."""
    from wtours.rundir import is_chain

    if is_chain(run_dir):
        from wtours.report.chain import write_reports

        return write_reports(run_dir)[0]
    from wtours.report.stage import write_report as write_stage_report

    return write_stage_report(run_dir)


def report_files(run_dir: str | Path) -> list[Path]:
    """The report files :func:`write_report` writes in ``run_dir``."""
    from wtours.rundir import is_chain

    names = ("report.md", "report.html") if is_chain(run_dir) else ("report.md",)
    return [Path(run_dir) / n for n in names]
