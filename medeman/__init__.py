"""medeman: semi-supervised 3D medical image segmentation with a mean teacher and EMAN."""

from medeman.eman import make_teacher, momentum_at, update_teacher

__all__ = ["make_teacher", "update_teacher", "momentum_at"]
__version__ = "0.1.0"
