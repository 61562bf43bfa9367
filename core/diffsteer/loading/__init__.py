"""Weight files and single-file checkpoints."""

from diffsteer.loading.errors import ModelLoadError, WeightsError
from diffsteer.loading.single_file import (
    COMPONENTS,
    SingleFileInfo,
    detect_single_file,
    load_single_file,
    split_single_file,
    to_single_file,
    write_single_file,
)
from diffsteer.loading.single_file_clip import align_text_encoder_keys
from diffsteer.loading.weights import apply_state_dict, load_state_dict, save_state_dict

__all__ = [
    "COMPONENTS",
    "ModelLoadError",
    "SingleFileInfo",
    "WeightsError",
    "align_text_encoder_keys",
    "apply_state_dict",
    "detect_single_file",
    "load_single_file",
    "load_state_dict",
    "save_state_dict",
    "split_single_file",
    "to_single_file",
    "write_single_file",
]
