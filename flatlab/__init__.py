"""flatlab: flat minima, quantization-aware training and out-of-domain generalization.

The package follows one flow: data -> training -> checkpoint -> measurements -> results (HDF5)
-> reports and figures. Each stage reads only what the stage before it wrote.
"""

from __future__ import annotations

__version__ = "0.1.0"

from flatlab.errors import FlatlabError

__all__ = ["FlatlabError", "__version__"]
