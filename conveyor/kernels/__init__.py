"""conveyor's C++ extension, shared by ``models/`` and ``attention/``.

``build``: compiling and loading ``conveyor/csrc`` once per process (``LOADER``, ``is_available``).
``dispatch``: which paths a model takes (the C++ ops or the torch reference), decided once from
its dtype, device and shapes when it is built (``decide``), never per layer per step.
"""

from conveyor.kernels.build import (ARCH_FLAGS, LOADER, SOURCES, KernelLoader, KernelUnavailable,
                                    arch_flags, build_and_load, build_dir, is_available)
from conveyor.kernels.dispatch import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, KernelDispatch,
                                       decide)

__all__ = ["ARCH_FLAGS", "LOADER", "SOURCES", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS",
           "KernelDispatch", "KernelLoader", "KernelUnavailable", "arch_flags", "build_and_load",
           "build_dir", "decide", "is_available"]
