"""Hugging Face causal LMs: the one kind of model fedglm fine-tunes (see families.py)."""

from __future__ import annotations

import os

# Nothing is ever downloaded: a model is a local folder (folder.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()
_hf_logging.set_verbosity_error()
