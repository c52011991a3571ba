"""Expert banks: 3-D weights run as grouped matmuls over expert-contiguous rows."""

from routelab.experts.swiglu import SwiGLUExperts

__all__ = ["SwiGLUExperts"]
