"""Core test settings; the fixtures come from diffsteer's fixture kit (diffsteer.testing.fixtures)."""

from __future__ import annotations

import os

import torch

from diffsteer.testing import SD1_SCHEDULER, SD2_SCHEDULER, build_tiny_sd, tiny_unet_config  # noqa: F401

# Tests are small; one thread avoids oversubscribing the 2-core CI machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
