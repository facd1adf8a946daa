"""kplib — Knowledge Proxy Learning (KPL, AAAI 2025) for training-free zero-shot medical image classification.

See ARCHITECTURE.md for the module contract and ../shared/docs/kpl-method.md for the method.
"""
from .errors import KPLError, KPLInputError, StandInWarning

__version__ = "0.1.0"
__all__ = ["KPLError", "KPLInputError", "StandInWarning", "__version__"]
