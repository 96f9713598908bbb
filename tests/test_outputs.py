"""File names of a case's outputs: what infer writes, evaluate and rank read back by case id."""

from __future__ import annotations

from pathlib import Path

import pytest

from medeman.outputs import mask_path, picture_path, prediction_id, probabilities_path, uncertainty_path

NAME_CASES = [
    ("mask", mask_path("out", "case_7"), "out/case_7.nii.gz"),
    ("mask as nrrd", mask_path("out", "case_7", ".nrrd"), "out/case_7.nrrd"),
    ("probabilities", probabilities_path("out", "case_7"), "out/case_7_probs.nii.gz"),
    ("uncertainty", uncertainty_path("rank", "case_7"), "rank/uncertainty/case_7.nii.gz"),
    ("picture", picture_path("png", "case_7"), "png/case_7.png"),
]


@pytest.mark.parametrize("name, got, expected", NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_output_names(name, got, expected):
    assert got == Path(expected)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_written_mask_reads_back_as_its_case_and_a_probability_map_as_none(suffix):
    assert prediction_id(mask_path("out", "liver_0007", suffix)) == "liver_0007"
    assert prediction_id(probabilities_path("out", "liver_0007")) is None
