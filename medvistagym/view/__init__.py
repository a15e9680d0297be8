"""The trajectory viewer: `medvistagym view TRAJECTORIES -o report.html` writes one
self-contained HTML report of the episodes in rollout / training Parquet files."""

from .report import Report, build_report, summarize

__all__ = ["Report", "build_report", "summarize"]
