"""Data: LightningDataModules, the built-in synthetic data and rater fusion."""

from probseg.data.base import ProbSegDataModule
from probseg.data.fusion import random_rater
from probseg.data.synthetic import SyntheticCase, SyntheticDataModule, SyntheticDataset

__all__ = ["ProbSegDataModule", "SyntheticCase", "SyntheticDataModule", "SyntheticDataset", "random_rater"]
