"""The bundled demo model: its files (``config.json``, ``model.safetensors``, tokenizer, ``tuned_lens/``,
``card.json``, ``RECIPE.md``), the generated corpus it was trained on (:mod:`.corpus`) and its seeded
recipe (:mod:`.train`, ``python -m jaxlens.demo.train``)."""
