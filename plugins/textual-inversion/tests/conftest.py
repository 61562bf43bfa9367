"""Test settings of the textual-inversion plugin; model fixtures (tiny_sd1, shapes_pipe) come from diffsteer.testing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Small tests; one thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# concepts.py (the semantic tests' concepts and evaluator) sits next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
