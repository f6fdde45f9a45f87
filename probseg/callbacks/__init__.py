"""Callbacks: checkpoints, logging, figures and prediction files only; no metric maths."""

from probseg.callbacks.checkpoint import RunCheckpoint
from probseg.callbacks.predictions import HypothesisWriter
from probseg.callbacks.summary import FitSummary, csv_metrics_file

__all__ = ["FitSummary", "HypothesisWriter", "RunCheckpoint", "csv_metrics_file"]
