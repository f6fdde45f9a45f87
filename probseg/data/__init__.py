"""Data: LightningDataModules, the built-in synthetic data and rater fusion."""

from probseg.data.base import ProbSegDataModule
from probseg.data.fusion import FUSIONS, fuse_raters, majority_vote, random_rater, rater_weights
from probseg.data.synthetic import SyntheticCase, SyntheticDataModule, SyntheticDataset

__all__ = [
    "FUSIONS",
    "ProbSegDataModule",
    "SyntheticCase",
    "SyntheticDataModule",
    "SyntheticDataset",
    "fuse_raters",
    "majority_vote",
    "random_rater",
    "rater_weights",
]
