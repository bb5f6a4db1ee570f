"""The probe: the reference pipeline (spec/probe.md, logos-in-layers experiment 001) in one batched run.

* :mod:`.suite`        prompt suites as data (``configs/probe/*.toml``), thresholds
* :mod:`.gold`         tokenisation and gold-answer alignment (§1.3, §2.21)
* :mod:`.metrics`      per-layer metrics: primitives, copy detectors, the pure next-token columns (§2.1-2.3)
* :mod:`.summaries`    per-pass summaries and run-level probes (§2.4-2.11, 2.22, 2.24, 2.25, 2.27)
* :mod:`.passes`       stage 1-3: tokenise and align every pass, one batched forward + fused decodes, one
                       lens's rows and summaries per pass
* :mod:`.diagnostics`  lens-quality diagnostics (§2.12-2.28), one module per JSON block
* :mod:`.tuned`        the tuned lens inside the probe (§3.4-3.7); it plugs into the pipeline through
                       :func:`.passes.lens_pass_metrics` and never imports the pipeline
* :mod:`.pipeline`     stage 4-5: the JSON document, atomic outputs, ``run_probe``

The reference's file formats are written by :mod:`jaxlens.writers`.
"""
from jaxlens.probe.passes import PassInput, PassResult, lens_pass_metrics, pass_metrics, prepare, run_passes  # noqa: F401
from jaxlens.probe.pipeline import (  # noqa: F401
    FIXED_REFERENCE_BUGS, ProbeResult, assemble, milestones_table, output_names, run_probe, write_outputs,
)
