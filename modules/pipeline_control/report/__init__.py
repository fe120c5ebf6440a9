"""The static HTML run report written beside each run's log (docs/operations.md#run-report).

- :mod:`~modules.pipeline_control.report.gather`: what is shown, read from the database and outputs;
- :mod:`~modules.pipeline_control.report.figures`: the aggregated figures (matplotlib);
- :mod:`~modules.pipeline_control.report.render`: the HTML;
- :mod:`~modules.pipeline_control.report.build`: the folder, written atomically.
"""

from modules.pipeline_control.report.build import ReportInputs, report_dir, write_run_report

__all__ = ["ReportInputs", "report_dir", "write_run_report"]
