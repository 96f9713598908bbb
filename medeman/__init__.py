"""medeman: semi-supervised 3D medical image segmentation with a mean teacher and EMAN."""

from medeman.eman import EMANTeacher, make_teacher, momentum_at, update_teacher

# the built-in methods register themselves, their ssl.method choice and their own ssl.* keys into the config
# schema (medeman.methods.register_method); here, so that every config medeman loads knows them, while
# medeman.config itself imports no method (no import circle)
import medeman.methods  # noqa: E402,F401  # isort: skip

__all__ = ["EMANTeacher", "make_teacher", "update_teacher", "momentum_at"]
__version__ = "0.1.0"
