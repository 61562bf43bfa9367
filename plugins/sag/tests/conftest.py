"""Test settings of the sag plugin. The model fixtures (tiny_sd1, tiny_sd2, shapes_pipe) come from diffsteer.testing."""

from __future__ import annotations

import os

import torch

# Small tests; one thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
