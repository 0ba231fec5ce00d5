"""mechslice: how the representation dimension d governs a structurally pruned LLM.

Trace the activation flow, rotate and slice the residual stream SliceGPT-style, measure entropy and the output
shift, evaluate perplexity and multiple-choice accuracy, and fit the paper's laws.
"""

import os

# Nothing is downloaded at run time: every module of mechslice imports this package first, so these defaults are
# in place before any of them imports transformers (a caller's explicit setting wins).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hooks  # noqa: F401  (asks torch's allocator for huge pages before torch loads: hooks.allocator)
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "MechsliceError", "load_model"]
