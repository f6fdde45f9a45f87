"""Results tables restricted to image subsets: the rows against hand-made per-image values, the
rater coverage against a hand count, and the written and gathered tables."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from probseg.cli import main
from probseg.metrics import RaterCoverage
from probseg.results import gather, read_results, subset_rows, write_results


def test_rater_coverage_counts_the_present_raters_that_mark_a_structure() -> None:
    target = torch.zeros(3, 3, 4, 4, dtype=torch.long)
    target[0, 0, 1, 1] = 1  # image 0: 1 of 3 raters marks
    target[1, :, 2, 2] = 1  # image 1: all three mark ...
    target[1, 2] = 0  # ... except rater 2, who is absent below
    rater_mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    metric = RaterCoverage()
    metric.update(target, rater_mask, index=torch.tensor([5, 6, 7]))
    values, index = metric.per_image()
    assert index.tolist() == [5, 6, 7]
    torch.testing.assert_close(values["raters_marking"], torch.tensor([1 / 3, 1.0, 0.0], dtype=values["raters_marking"].dtype))
    with pytest.raises(ValueError, match="integer class ids"):
        metric.update(target.float())


def test_subset_rows_by_hand() -> None:
    """Four images: two empty for every rater, one marked by some, one by all."""
    marking = torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    ged = torch.tensor([0.0, 0.0, 0.4, 0.2], dtype=torch.float64)
    rows = subset_rows({"model": "m", "source": "model"}, {"ged": ged}, marking)
    by = {r["subset"]: r for r in rows}
    assert [r["subset"] for r in rows] == ["all", "any_rater", "all_raters"]
    assert by["all"]["num_images"] == 4 and by["all"]["ged_mean"] == pytest.approx(0.15)
    assert by["all"]["all_empty_fraction"] == pytest.approx(0.5)
    assert by["any_rater"]["num_images"] == 2 and by["any_rater"]["ged_mean"] == pytest.approx(0.3)
    assert by["all_raters"]["num_images"] == 1 and by["all_raters"]["ged_mean"] == pytest.approx(0.2)
    assert math.isnan(by["all_raters"]["ged_std"])
    empty = subset_rows({"model": "m"}, {"ged": ged[:2]}, marking[:2])
    assert [r["subset"] for r in empty] == ["all"], "a subset without images has no row"


def test_written_tables_and_the_gathered_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marking = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    rows = subset_rows({"model": "punet", "dataset": "d", "source": "model", "num_samples": 4},
                       {"ged": torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)}, marking)
    write_results(tmp_path / "run", rows)
    read = read_results(tmp_path / "run" / "test_results.csv")
    assert [(r["subset"], r["num_images"]) for r in read] == [("all", 3), ("any_rater", 2), ("all_raters", 1)]
    assert read[0]["all_empty_fraction"] == pytest.approx(1 / 3)
    markdown = (tmp_path / "run" / "test_results.md").read_text()
    assert "| punet (every rater marks a structure) | d | 1 |" in markdown
    table = gather([tmp_path], table1=False, subset="all_raters")
    assert "0.600" in table and "0.300" not in table
    assert main(["results", str(tmp_path), "--all-metrics", "--subset", "any_rater"]) == 0
    assert "0.450" in capsys.readouterr().out
    with pytest.raises(ValueError, match="subset must be one of"):
        gather([tmp_path], subset="some")


def test_results_files_without_a_subset_column_read_as_all(tmp_path: Path) -> None:
    path = tmp_path / "test_results.csv"
    path.write_text("model,dataset,source,num_images,num_samples,ged_mean,ged_std\npunet,d,model,3,4,0.2,0.1\n")
    (row,) = read_results(path)
    assert row["subset"] == "all" and row["num_images"] == 3
    assert "punet" in gather([path], table1=False)
