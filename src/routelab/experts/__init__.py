"""Expert banks: 3-D weights run as grouped matmuls over expert-contiguous rows."""

from routelab.experts.base import ExpertBank
from routelab.experts.clamped import ClampedSwiGLUExperts
from routelab.experts.gated import GatedSharedExpert
from routelab.experts.swiglu import SwiGLUExperts

__all__ = ["ClampedSwiGLUExperts", "ExpertBank", "GatedSharedExpert", "SwiGLUExperts"]
