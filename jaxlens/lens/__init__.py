"""Lenses: decoding every layer's residual stream through the unembedding.

* :mod:`.stats`     lens objects (norm / logit / raw / :class:`AffineLens`), ``lens_stats``, ``lens_logits``
* :mod:`.stream`    the vocab-streaming statistics kernel (online logsumexp, entropy, KL, rank, top-k)
* :mod:`.pairwise`  statistics between two lenses at the same rows, token-set masses, Gram cosine
* :mod:`.multi`     several lenses (stacked / tempered) in one streaming pass, calibration grids
* :mod:`.tuned`     tuned-lens translators and their three file formats (``load_lens`` / ``save_lens``)
* :mod:`.prism`     the Prism decoder (shared whitening + orthogonal map) and its two formats
  (``load_prism`` / ``save_prism``)
"""
from jaxlens.lens.stats import (  # noqa: F401
    BUILTIN, AffineLens, LensStats, cosine_to_final, lens_logits, lens_stats, normalise,
)
from jaxlens.lens.prism import PrismLens, load_prism, save_prism  # noqa: F401
