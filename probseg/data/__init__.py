"""Data: LightningDataModules, the built-in synthetic data and rater fusion."""

from probseg.data.arrays import ArrayDataModule, MultiRaterArrays, MultiRaterDataModule, split_by_patient
from probseg.data.base import ProbSegDataModule
from probseg.data.fusion import FUSIONS, fuse_raters, majority_vote, random_rater, rater_weights
from probseg.data.lidc import LIDCDataModule
from probseg.data.qubiq import QUBIQDataModule
from probseg.data.synthetic import SyntheticCase, SyntheticDataModule, SyntheticDataset

__all__ = [
    "FUSIONS",
    "ArrayDataModule",
    "LIDCDataModule",
    "MultiRaterArrays",
    "MultiRaterDataModule",
    "QUBIQDataModule",
    "ProbSegDataModule",
    "SyntheticCase",
    "SyntheticDataModule",
    "SyntheticDataset",
    "fuse_raters",
    "majority_vote",
    "random_rater",
    "rater_weights",
    "split_by_patient",
]
