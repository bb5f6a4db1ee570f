"""Test session setup: 8 fake CPU devices (sharding tests), fp32 matmuls, offline hub, no compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# in-process CLI tests must not write the user's XLA cache (tests/test_compile_cache.py turns it on itself)
os.environ["JAXLENS_COMPILE_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
