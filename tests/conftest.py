"""Load autograd before any test module imports NumPy: it sets the BLAS/OpenMP
thread policy (and the allocator setting) that must be in place when NumPy loads."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autograd  # noqa: E402,F401
