"""jaxlens: layer-by-layer lenses for Hugging Face causal language models, in JAX.

Public names (README, "Python"): :func:`load_model`, :func:`lens_stats`, :func:`lens_logits`,
:func:`load_lens`.
"""
from jaxlens.errors import JaxlensError
from jaxlens.lens.stats import AffineLens, LensStats, lens_logits, lens_stats
from jaxlens.models.loader import Model, load_model
from jaxlens.lens.tuned import load_lens, save_lens

__version__ = "0.1.0"

__all__ = ["AffineLens", "JaxlensError", "LensStats", "Model", "lens_logits", "lens_stats", "load_lens", "load_model",
           "save_lens", "__version__"]
from jaxlens import sweep  # noqa: E402,F401 - callable: jaxlens.sweep(models, prompts, out, ...) (docs/sweep.md)
