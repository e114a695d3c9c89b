"""retrieval-heads: find the attention heads a language model uses to pull facts out of a long context.

>>> from retrieval_heads import detect
>>> result = detect(model="smollm2", question="inc_state", tokens=1024, samples=4)   # doctest: +SKIP
>>> result.top(5)                                                                     # doctest: +SKIP
"""

from .ablation import AblationResult, ablate
from .errors import UserError
from .experiments import DetectResult, detect
from .models import LoadedModel, load_model

__all__ = ["AblationResult", "DetectResult", "LoadedModel", "UserError", "ablate", "detect", "load_model"]
__version__ = "0.1.0"
