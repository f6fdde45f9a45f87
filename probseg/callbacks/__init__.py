"""Callbacks: checkpoints, logging, figures and prediction files only; no metric maths."""

from probseg.callbacks.checkpoint import RunCheckpoint
from probseg.callbacks.evaluation import EvaluationCallback
from probseg.callbacks.fast import FastPaths
from probseg.callbacks.gini import GiniCallback
from probseg.callbacks.predictions import HypothesisWriter
from probseg.callbacks.sample_grid import SampleGridCallback
from probseg.callbacks.summary import FitSummary, csv_metrics_file

__all__ = [
    "EvaluationCallback",
    "FastPaths",
    "FitSummary",
    "GiniCallback",
    "HypothesisWriter",
    "RunCheckpoint",
    "SampleGridCallback",
    "csv_metrics_file",
]
