"""The dtype names recipes, checkpoints and CLIs accept, with their numpy types; each backend derives its own from
these names, so a name means the same dtype everywhere."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
COMPUTE_DTYPES = ("float32", "bfloat16")  # what a model computes in (recipes' compute_dtype, the CLIs' --dtype)
