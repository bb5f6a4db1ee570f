"""Probe diagnostics: spec/probe.md §2.12-2.20, §2.23, §2.26, §2.28 and the raw-lens / milestones /
artefact-audit CSVs of §5.1.

One module per block of the JSON:

* :mod:`.calibration`  last-layer consistency (§2.12), norm temperatures (§2.13)
* :mod:`.geometry`     normalisation provenance, layer map, residual-norm trajectory (§2.14)
* :mod:`.raw_vs_norm`  raw-vs-norm lens checks: samples, windows, full sweep, artefact score (§2.15)
* :mod:`.semantics`    confirmed semantics (§2.16), lens consistency (§2.17), decoding point (§2.18), gates (§2.19)
* :mod:`.health`       numeric health (§2.20), repeatability (§2.23), position window (§3.6 / Q3)
* :mod:`.guidance`     measurement guidance (§2.26), evaluation pack and its CSVs (§2.28)
* :mod:`.stage`        the probe's two diagnostics stages: the fused decode stage on the cached forward
                       (before ``pass_metrics``; its vocabulary-sized passes are :mod:`jaxlens.lens.multi`)
                       and the summary stage after it

Reference bugs handled here (spec Appendix A; ``docs/reference_bugs.md``): Q3 (position window scores
the gold only at the last position), Q5 (raw-lens sample summary computed once from the primary pass),
Q13 (forward-of-two Jaccard over top-5) and N2 (the reference writes the last fact's raw/consecutive
Jaccards into every pos row of the same variant) are fixed by default and reproduced with
``metrics.ReferenceQuirks`` flags; Q14 (in-sample calibration) is reproduced and stated in the JSON.
"""
from .calibration import (  # noqa: F401
    temperature_grid, fit_norm_temperatures, kl_bits_rows, temperature_probe, head_transforms,
    last_layer_consistency, norm_temp_snapshots,
)

from .geometry import (  # noqa: F401
    resid_geometry, ln_source, normalization_provenance, layer_map, norm_trajectory,
)

from .raw_vs_norm import (  # noqa: F401
    raw_sample_layers, raw_samples, raw_sample_summary, window_radius, window_centres, window_layers,
    window_rows, window_summary, topk_jaccard_np, full_rows, full_summary, artifact_score,
    artifact_score_config,
)

from .semantics import (  # noqa: F401
    confirmed_semantics, topk_order, rank_in_order, consistency_metrics, lens_consistency, decoding_point_entry,
    semantic_milestones, decoding_point_targets, decoding_point, gate_stability,
)

from .health import (  # noqa: F401
    numeric_health, repeatability, repeatability_flag, preferred_milestone, forward_gate, POSITION_GRID,
    position_grid, position_window,
)

from .guidance import (  # noqa: F401
    REASON_ORDER, FLAG_ORDER, diagnostic_flags, measurement_guidance, evaluation_pack, milestone_rows,
    artifact_audit_rows,
)

from .stage import (  # noqa: F401
    DiagnosticsOptions, TunedInputs, DecodeDiagnostics, decode_diagnostics, DiagnosticsResult, run_diagnostics,
)
