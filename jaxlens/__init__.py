"""jaxlens: layer-by-layer lenses for Hugging Face causal language models, in JAX.

Public names (see shared/API.md): :func:`load_model`, :func:`lens_stats`, :func:`lens_logits`,
:func:`load_lens`.
"""
from .errors import JaxlensError
from .lens import lens_logits
from .loader import Model, load_model

__version__ = "0.1.0"

__all__ = ["JaxlensError", "Model", "lens_logits", "load_model", "__version__"]
