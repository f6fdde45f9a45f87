"""Callbacks: checkpoints, logging and figures only (metric maths lives in probseg.metrics)."""

from probseg.callbacks.checkpoint import RunCheckpoint
from probseg.callbacks.summary import FitSummary, csv_metrics_file

__all__ = ["FitSummary", "RunCheckpoint", "csv_metrics_file"]
