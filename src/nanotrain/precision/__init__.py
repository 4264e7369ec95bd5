"""Mixed precision: low-bit formats emulated exactly (formats.py) and their scaling recipes (scaling.py)."""

from .formats import E2M1, E4M3, E5M2, FORMATS, FloatFormat, grid, quantize, quantize_e8m0
from .scaling import blockwise, mxfp4, nvfp4, tensorwise

__all__ = ["E2M1", "E4M3", "E5M2", "FORMATS", "FloatFormat", "blockwise", "grid", "mxfp4", "nvfp4", "quantize",
           "quantize_e8m0", "tensorwise"]
