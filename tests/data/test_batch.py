"""The batch contract (probseg/data/batch.py): one check, clear errors, one host read."""

from __future__ import annotations

import pytest
import torch

from probseg.data.batch import (
    BatchError,
    BatchTypeError,
    check_batch,
    check_batch_layout,
)
from tests.helpers import HostReads


def _batch(b: int = 3, r: int = 2, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(b, 1, size, size, generator=g),
        "masks": torch.randint(0, 2, (b, r, size, size), generator=g),
        "rater_mask": torch.tensor([[True, True], [True, False], [False, True]])[:b],
        "id": [f"case{i}" for i in range(b)],
    }


def test_a_valid_batch_passes_with_one_host_read_and_its_layout_with_none() -> None:
    batch = _batch()
    with HostReads() as counter:
        check_batch(batch, in_channels=1, num_classes=2)
    assert len(counter.reads) == 1
    with HostReads() as counter:
        image, masks = check_batch_layout(batch, in_channels=1)
    assert counter.reads == [] and image is batch["image"] and masks is batch["masks"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: b.pop("masks"), KeyError, "no 'masks' entry"),
        (lambda b: b.update(image=b["image"].numpy()), BatchTypeError, r"batch\['image'\] must be a torch.Tensor"),
        (lambda b: b.update(image=b["image"][:, 0]), BatchTypeError, r"\(B, C, H, W\) float tensor, got .* \(3, 8, 8\)"),
        (lambda b: b.update(image=b["image"].long()), BatchTypeError, "float tensor, got torch.int64"),
        (lambda b: b.update(image=b["image"].repeat(1, 2, 1, 1)), BatchError, r"must be \(B, 1, H, W\), got \(3, 2, 8, 8\)"),
        (lambda b: b.update(masks=b["masks"].float()), BatchTypeError, "integer class ids"),
        (lambda b: b.update(masks=b["masks"].bool()), BatchTypeError, "integer class ids"),
        (lambda b: b.update(masks=b["masks"][:2]), BatchError, "must agree in B, H and W"),
        (lambda b: b.update(masks=b["masks"][..., :4]), BatchError, "must agree in B, H and W"),
        (lambda b: b.update(rater_mask=torch.ones(3, 3, dtype=torch.bool)), BatchError, r"rater_mask'\] must be a \(B, R\) = \(3, 2\)"),
        (lambda b: b.update(rater_mask=torch.ones(3, 2)), BatchError, "bool tensor, got"),
        (lambda b: b.update(masks=b["masks"] + 1), BatchError, r"class ids in \[1, 2\], outside \[0, 1\]"),
        (lambda b: b.update(masks=b["masks"] - 1), BatchError, r"class ids in \[-1, 0\]"),
        (lambda b: b["image"].__setitem__((2, 0, 1, 1), float("nan")), BatchError, "image case2 holds NaN or Inf"),
        (lambda b: b["image"].__setitem__((1, 0, 0, 0), float("-inf")), BatchError, "image case1 holds NaN or Inf"),
        (lambda b: b["rater_mask"].__setitem__((1, 0), False), BatchError, "1 row.* of batch\\['rater_mask'\\] are all False"),
    ],
)
def test_each_breach_of_the_contract_names_the_key_and_shape(change, error: type, match: str) -> None:
    batch = _batch()
    change(batch)
    with pytest.raises(error, match=match):
        check_batch(batch, in_channels=1, num_classes=2)


def test_type_errors_are_also_value_errors_for_callers_of_either() -> None:
    batch = _batch()
    batch["masks"] = batch["masks"].float()
    for kind in (TypeError, ValueError):
        with pytest.raises(kind):
            check_batch(batch)


def test_the_first_non_finite_image_is_named_by_position_without_ids() -> None:
    batch = _batch()
    del batch["id"]
    batch["image"][1, 0, 3, 3] = float("inf")
    batch["image"][2, 0, 3, 3] = float("nan")
    with pytest.raises(BatchError, match="image number 1 of the batch holds NaN or Inf"):
        check_batch(batch)


def test_without_num_classes_only_negative_ids_are_refused() -> None:
    batch = _batch()
    batch["masks"] = batch["masks"] * 7
    check_batch(batch)
    with pytest.raises(BatchError, match="outside"):
        check_batch(batch, num_classes=2)
