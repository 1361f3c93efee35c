"""GLUE data: task specs, split loading (local files or the HF hub) and the K-shot protocol."""

from unipelt.data.glue import (
    ENV_DATA_DIR,
    HUB_DATASET,
    DataError,
    MissingDataError,
    default_data_dir,
    features_for,
    load_split,
    split_path,
)
from unipelt.data.kshot import FULL, TaskData, build_task_data, check_data_seed, check_k, kshot_indices, split_hash
from unipelt.data.tasks import TASKS, TaskSpec, get_task

__all__ = [
    "ENV_DATA_DIR",
    "FULL",
    "HUB_DATASET",
    "TASKS",
    "DataError",
    "MissingDataError",
    "TaskData",
    "TaskSpec",
    "build_task_data",
    "check_data_seed",
    "check_k",
    "default_data_dir",
    "features_for",
    "get_task",
    "kshot_indices",
    "load_split",
    "split_hash",
    "split_path",
]
