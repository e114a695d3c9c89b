"""retrieval-heads: find the attention heads a language model uses to pull facts out of a long context.

>>> from retrieval_heads import detect
>>> result = detect(model="smollm2", question="inc_state", tokens=1024, samples=4)   # doctest: +SKIP
>>> result.top(5)                                                                     # doctest: +SKIP

The public names are imported on first use (PEP 562), so that ``import retrieval_heads`` and the commands
that do not run a model (``--help``, ``report``, ``export``) do not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .ablation import AblationResult, ablate
    from .experiments import DetectResult, detect
    from .models import LoadedModel, load_model

_LAZY = {"AblationResult": "ablation", "ablate": "ablation", "DetectResult": "experiments", "detect": "experiments",
         "LoadedModel": "models", "load_model": "models"}

__all__ = ["AblationResult", "DetectResult", "LoadedModel", "UserError", "ablate", "detect", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
