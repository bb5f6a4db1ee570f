"""Models: a Hugging Face causal LM as one scanned Flax (NNX) decoder.

* :mod:`.spec`        ``ArchSpec`` from a HF ``config.json`` (both spellings; unknown math-changing keys refused)
* :mod:`.decoder`     the one decoder, scanned over stacked layers; per-layer window / RoPE as scanned data
* :mod:`.convert`     the declarative weight tables (HF name -> jaxlens path + transform)
* :mod:`.checkpoint`  safetensors / sharded index / ``.bin`` / Flax msgpack readers
* :mod:`.loader`      ``load_model``, the ``Model`` object, streamed loading onto a mesh
* :mod:`.sharding`    logical axis names -> mesh rules (declared once)
"""
