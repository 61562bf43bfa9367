"""Core test settings. Fixtures (tiny_sd1, tiny_sd2, tiny_pipe, shapes_pipe) come from diffsteer's
fixture kit, `diffsteer.testing.fixtures`, which pytest loads through its entry point."""

from __future__ import annotations

import os

import torch

# Tests are small; one thread avoids oversubscribing the 2-core CI machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
