"""SliceGPT in place: norm fusion, PCA rotation, slicing to width d', shortcut matrices, save and load."""

from mechslice.slicing.fusion import fuse_norms
from mechslice.slicing.io import load_sliced, save_sliced
from mechslice.slicing.slicer import Slicer, SlicingRecord, slice_model, sliced_width

__all__ = [
    "Slicer",
    "SlicingRecord",
    "fuse_norms",
    "load_sliced",
    "save_sliced",
    "slice_model",
    "sliced_width",
]
