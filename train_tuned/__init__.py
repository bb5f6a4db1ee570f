"""Tuned-lens training for jaxlens (``jaxlens train-lens`` / ``jaxlens eval-lens``).

* :mod:`train_tuned.train`    recipes -> plan, the jitted SPMD step (data / fsdp / tensor, several hosts), orbax
                              checkpoints, exact resume (also on another mesh)
* :mod:`train_tuned.loss`     the streaming (vocab-chunked) distillation loss with a custom VJP, and its
                              vocabulary-parallel form (statistics merged across shards)
* :mod:`train_tuned.memory`   ``--plan-only``: the step's per-device memory from abstract parameters
* :mod:`train_tuned.data`     text / JSONL / HF-streaming sources, packing, seeded order, content hash
* :mod:`train_tuned.evaluate` per-layer CE / entropy / KL of the logit and tuned lenses

The lens objects and the on-disk formats live in :mod:`jaxlens.lens.tuned`.
"""
from .evaluate import evaluate_lens
from .train import load_recipe, make_plan, train_lens

__all__ = ["evaluate_lens", "load_recipe", "make_plan", "train_lens"]
