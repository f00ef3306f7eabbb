#!/usr/bin/python3
"""usage: compare.py Y.npy EXPECTED.npy TOLERANCE -- fails unless max|y-e|/max|e| <= TOLERANCE."""
import sys

import numpy as np

y, expected, tolerance = np.load(sys.argv[1]), np.load(sys.argv[2]), float(sys.argv[3])
if y.shape != expected.shape or y.dtype != np.float32:
    sys.exit(f"shape/dtype mismatch: {y.shape} {y.dtype} vs {expected.shape}")
relative = float(np.abs(y - expected).max() / max(np.abs(expected).max(), 1e-30))
print(f"max relative difference to the NumPy computation: {relative:.3g}")
sys.exit(0 if relative <= tolerance else 1)
