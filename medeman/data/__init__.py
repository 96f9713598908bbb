"""Data: cohort discovery, input checks, and the semi-supervised Lightning DataModule."""

from medeman.data.checks import CaseReport, check_cases, inspect_case, raise_problems, report_problems
from medeman.data.datamodule import SSLDataModule
from medeman.data.discovery import (
    discover_labeled,
    discover_unlabeled,
    group_channels,
    label_id,
    match_labels,
    read_dataset_json,
    split_cases,
    write_split,
)
from medeman.data.errors import DataError
from medeman.data.readers import IMAGE_SUFFIXES, SimpleITKReader, VolumeReader

__all__ = [
    "CaseReport", "DataError", "IMAGE_SUFFIXES", "SSLDataModule", "SimpleITKReader", "VolumeReader",
    "check_cases", "discover_labeled", "discover_unlabeled", "group_channels", "inspect_case", "label_id",
    "match_labels", "raise_problems", "read_dataset_json", "report_problems", "split_cases", "write_split",
]
