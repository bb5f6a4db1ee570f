"""Probe prompt suites: a TOML file -> validated, frozen dataclasses (spec/probe.md §1.2 and §2).

A suite is the data of the probe: the prompt templates (variants), the positive facts, the negative
control, the final-head test prompts, the temperature-exploration prompt, the important words of the
records CSV, and every numeric threshold of spec §2. ``configs/probe/reference.toml`` is the
reference suite; users write their own (other facts, other languages) in the same format.

    suite = load_suite("reference")            # or a path to a .toml file
    for p in suite.passes():                   # the lens passes in reference order (§1.4)
        p.prompt_id, p.variant, p.text, p.answer, p.fact_key, p.fact_index

Every validation problem raises :class:`jaxlens.errors.JaxlensError` with one sentence naming the
file and the field (``reference.toml: facts[2].answer must be a non-empty string``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Optional

from jaxlens.errors import JaxlensError

__all__ = [
    "ARROW",
    "Fact",
    "PromptRef",
    "PromptPass",
    "Control",
    "TemperatureExploration",
    "FinalHeadConfig",
    "RecordsConfig",
    "CopyThresholds",
    "SemanticThresholds",
    "SurfaceThresholds",
    "ControlThresholds",
    "LastLayerThresholds",
    "NormTemperatureThresholds",
    "TrajectoryThresholds",
    "RawLensThresholds",
    "ArtifactScoreThresholds",
    "LensConsistencyThresholds",
    "DecodingPointThresholds",
    "GateStabilityThresholds",
    "RepeatabilityThresholds",
    "GoldThresholds",
    "Thresholds",
    "Suite",
    "load_suite",
    "suite_from_dict",
    "suite_search_paths",
]

#: The arrow used in fact keys ("Germany→Berlin").
ARROW = "\u2192"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ----------------------------------------------------------------------------------------------
# Threshold groups. Field metadata: "check" in {"prob", "pos", "nonneg", "posint", "any"};
# "elem" gives the element type of a tuple field ("float" / "int").
# ----------------------------------------------------------------------------------------------

def _f(default, check="any", elem=None):
    meta = {"check": check}
    if elem is not None:
        meta["elem"] = elem
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CopyThresholds:
    """§2.3 copy-collapse detectors (strict, strict sweep, soft) and the stability rule."""

    strict_threshold: float = _f(0.95, "prob")
    strict_margin: float = _f(0.10, "prob")
    strict_window_k: int = _f(1, "posint")
    strict_sweep: tuple = _f((0.7, 0.8, 0.9, 0.95), "prob", "float")
    soft_threshold: float = _f(0.5, "prob")
    soft_window_ks: tuple = _f((1, 2, 3), "posint", "int")
    soft_extra_thresholds: tuple = _f((), "prob", "float")
    stability_stable_layers: int = _f(2, "nonneg")
    stability_stable_frac: float = _f(0.05, "nonneg")
    stability_fragile_layers: int = _f(6, "nonneg")
    stability_fragile_frac: float = _f(0.15, "nonneg")

    @property
    def window_max(self) -> int:
        """Length of the rolling top-1 window: max(strict k, soft ks)."""
        return max((self.strict_window_k,) + tuple(self.soft_window_ks))


@dataclass(frozen=True)
class SemanticThresholds:
    """§2.4 entropy collapse, §2.5 semantic gates, §2.9 answer margins."""

    entropy_collapse_bits: float = _f(1.0, "nonneg")
    margin_delta_abs: float = _f(0.002, "prob")
    top2_delta_logit: float = _f(0.5, "nonneg")
    answer_gap_thresholds: tuple = _f((0.5, 1.0), "nonneg", "float")
    rank_milestones: tuple = _f((1, 5, 10), "posint", "int")
    kl_milestones: tuple = _f((0.5, 1.0), "nonneg", "float")
    confirm_window: int = _f(2, "nonneg")


@dataclass(frozen=True)
class SurfaceThresholds:
    """§2.2 cosine milestones, §2.6 surface mass, §2.7 geometry, §2.8 top-K prompt mass."""

    surface_delta: float = _f(0.05, "nonneg")
    geom_gamma: float = _f(0.02, "any")
    topk_prompt_k: int = _f(50, "posint")
    topk_prompt_tau: float = _f(0.33, "prob")
    cos_milestones: tuple = _f((0.2, 0.4, 0.6), "any", "float")


@dataclass(frozen=True)
class ControlThresholds:
    """§2.10 negative control."""

    delta_top2_logit: float = _f(0.5, "nonneg")


@dataclass(frozen=True)
class LastLayerThresholds:
    """§2.12 last-layer consistency."""

    warn_kl_bits: float = _f(0.25, "nonneg")
    temp_grid_min: float = _f(0.1, "pos")
    temp_grid_max: float = _f(10.0, "pos")
    temp_grid_points: int = _f(25, "posint")


@dataclass(frozen=True)
class NormTemperatureThresholds:
    """§2.13 per-layer norm-lens temperatures."""

    grid_min: float = _f(0.2, "pos")
    grid_max: float = _f(5.0, "pos")
    grid_points: int = _f(25, "posint")
    snapshot_fractions: tuple = _f((0.25, 0.5, 0.75), "prob", "float")


@dataclass(frozen=True)
class TrajectoryThresholds:
    """§2.14 norm-trajectory classifier."""

    spike_ratio: float = _f(3.0, "pos")
    spike_cos: float = _f(0.8, "any")
    plateau_slope: float = _f(0.01, "nonneg")
    monotonic_r2: float = _f(0.70, "prob")


@dataclass(frozen=True)
class RawLensThresholds:
    """§2.15 raw-vs-norm checks."""

    window_radius: int = _f(4, "nonneg")
    window_radius_high_risk: int = _f(8, "nonneg")
    risk_high_kl_bits: float = _f(1.0, "nonneg")
    risk_medium_kl_bits: float = _f(0.5, "nonneg")
    topk_jaccard_k: int = _f(50, "posint")
    js_le: float = _f(0.1, "nonneg")
    l1_le: float = _f(0.5, "nonneg")
    jaccard_ge: float = _f(0.5, "prob")


@dataclass(frozen=True)
class ArtifactScoreThresholds:
    """§2.15 (d) lens-artifact score v1/v2 and tiers."""

    weight_pct_kl_ge_1: float = _f(0.6, "nonneg")
    weight_norm_only: float = _f(0.3, "nonneg")
    weight_max_kl_scaled: float = _f(0.1, "nonneg")
    max_kl_scale_bits: float = _f(5.0, "pos")
    tier_low: float = _f(0.2, "nonneg")
    tier_high: float = _f(0.5, "nonneg")
    v2_js_p50: float = _f(0.1, "nonneg")
    v2_js_scale: float = _f(0.1, "pos")
    v2_l1_p50: float = _f(0.05, "nonneg")
    v2_l1_scale: float = _f(0.5, "pos")


@dataclass(frozen=True)
class LensConsistencyThresholds:
    """§2.17 lens consistency flag."""

    low_jaccard_at_10: float = _f(0.30, "prob")
    low_spearman_top50: float = _f(0.30, "any")


@dataclass(frozen=True)
class DecodingPointThresholds:
    """§2.18 decoding-point gate."""

    jaccard_at_10_min: float = _f(0.5, "prob")


@dataclass(frozen=True)
class GateStabilityThresholds:
    """§2.19 gate stability under small rescalings."""

    scales: tuple = _f((0.90, 0.95, 1.05, 1.10), "pos", "float")
    min_both_gates_pass_frac: float = _f(0.75, "prob")


@dataclass(frozen=True)
class RepeatabilityThresholds:
    """§2.23 re-decode and forward-of-two repeatability."""

    max_rank_dev: int = _f(5, "nonneg")
    max_top1_flip_rate: float = _f(0.02, "prob")
    forward_tolerance_layers: int = _f(1, "nonneg")
    forward_topk_jaccard_min: float = _f(0.5, "prob")
    forward_topk_k: int = _f(10, "posint")


@dataclass(frozen=True)
class GoldThresholds:
    """§2.21 gold alignment."""

    pieces_k: int = _f(4, "posint")


@dataclass(frozen=True)
class Thresholds:
    """All numeric thresholds of spec §2, grouped by section; defaults are the reference values."""

    copy: CopyThresholds = field(default_factory=CopyThresholds)
    semantic: SemanticThresholds = field(default_factory=SemanticThresholds)
    surface: SurfaceThresholds = field(default_factory=SurfaceThresholds)
    control: ControlThresholds = field(default_factory=ControlThresholds)
    last_layer: LastLayerThresholds = field(default_factory=LastLayerThresholds)
    norm_temperature: NormTemperatureThresholds = field(default_factory=NormTemperatureThresholds)
    trajectory: TrajectoryThresholds = field(default_factory=TrajectoryThresholds)
    raw_lens: RawLensThresholds = field(default_factory=RawLensThresholds)
    artifact_score: ArtifactScoreThresholds = field(default_factory=ArtifactScoreThresholds)
    lens_consistency: LensConsistencyThresholds = field(default_factory=LensConsistencyThresholds)
    decoding_point: DecodingPointThresholds = field(default_factory=DecodingPointThresholds)
    gate_stability: GateStabilityThresholds = field(default_factory=GateStabilityThresholds)
    repeatability: RepeatabilityThresholds = field(default_factory=RepeatabilityThresholds)
    gold: GoldThresholds = field(default_factory=GoldThresholds)


# ----------------------------------------------------------------------------------------------
# Suite data
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    """One positive fact: ``subject`` fills the templates, ``answer`` is the gold string."""

    index: int
    subject: str
    answer: str
    key: str
    fields: tuple = ()  # extra (name, value) placeholders, e.g. (("country", "Germany"),)

    def placeholders(self) -> dict:
        d = {"subject": self.subject, "answer": self.answer}
        d.update(dict(self.fields))
        return d


@dataclass(frozen=True)
class PromptRef:
    """A reference to a suite prompt: a fact under a variant, or the control prompt."""

    fact: Optional[int] = None
    variant: Optional[str] = None
    control: bool = False


@dataclass(frozen=True)
class PromptPass:
    """One lens pass (spec §1.4): one prompt, its gold answer string and its bookkeeping tags."""

    prompt_id: str            # "pos" or "ctl"
    variant: str              # template name ("orig", "no_filler", ...)
    text: str
    answer: str
    fact_key: Optional[str]   # None on the control pass
    fact_index: Optional[int]  # None on the control pass

    @property
    def is_control(self) -> bool:
        return self.prompt_id == "ctl"


@dataclass(frozen=True)
class Control:
    """The negative control: exact prompt text, its gold answer, and its bookkeeping."""

    key: str
    prompt: str
    answer: str
    variant: str


@dataclass(frozen=True)
class TemperatureExploration:
    prompt: PromptRef
    temperatures: tuple
    top_k: int


@dataclass(frozen=True)
class FinalHeadConfig:
    final_prediction_top_k: int
    test_prompts_top_k: int
    test_prompts: tuple
    temperature_exploration: TemperatureExploration


@dataclass(frozen=True)
class RecordsConfig:
    important_words: tuple
    top_k_verbose: int = 20
    top_k_default: int = 5
    pure_top_k: int = 5


@dataclass(frozen=True)
class Suite:
    """A validated probe suite. Build it with :func:`load_suite` or :func:`suite_from_dict`."""

    name: str
    description: str
    source: str
    templates: tuple           # ((variant, template), ...) in pass order; the first is primary
    facts: tuple               # (Fact, ...) in pass order; the first is the primary fact
    control: Control
    calibration_prompts: tuple  # (PromptRef, ...)
    skip_layer_prompts: tuple   # (PromptRef, ...)
    final_head: FinalHeadConfig
    records: RecordsConfig
    thresholds: Thresholds

    # -- variants ----------------------------------------------------------------------------
    @property
    def variants(self) -> tuple:
        return tuple(name for name, _ in self.templates)

    @property
    def primary_variant(self) -> str:
        return self.templates[0][0]

    @property
    def ablation_variant(self) -> Optional[str]:
        """The variant compared with the primary one in ``ablation_summary`` (second template)."""
        return self.templates[1][0] if len(self.templates) > 1 else None

    def template(self, variant: str) -> str:
        for name, text in self.templates:
            if name == variant:
                return text
        raise JaxlensError(f"suite {self.name!r} has no template named {variant!r}.")

    # -- prompts -----------------------------------------------------------------------------
    @property
    def primary_fact(self) -> Fact:
        return self.facts[0]

    @property
    def fact_keys(self) -> list:
        """``prompts.facts_micro_suite`` of the JSON."""
        return [f.key for f in self.facts]

    def prompt_text(self, fact_index: int, variant: str) -> str:
        return _fill(self.template(variant), self.facts[fact_index].placeholders())

    def fact_pass(self, fact_index: int, variant: str) -> PromptPass:
        f = self.facts[fact_index]
        return PromptPass("pos", variant, self.prompt_text(fact_index, variant), f.answer, f.key, f.index)

    def control_pass(self) -> PromptPass:
        c = self.control
        return PromptPass("ctl", c.variant, c.prompt, c.answer, None, None)

    @property
    def primary(self) -> PromptPass:
        """The primary pass: fact 0 under the primary variant (pos/orig/Germany)."""
        return self.fact_pass(0, self.primary_variant)

    def passes(self) -> list:
        """All lens passes in reference order: each fact x each variant, then the control."""
        out = [self.fact_pass(f.index, v) for f in self.facts for v in self.variants]
        out.append(self.control_pass())
        return out

    def gold_alignment_order(self) -> list:
        """Order of ``gold_alignment_prompts`` (§2.21): primary, control, the primary fact's other
        variants, then every other fact under every variant."""
        out = [self.primary, self.control_pass()]
        out += [self.fact_pass(0, v) for v in self.variants[1:]]
        out += [self.fact_pass(f.index, v) for f in self.facts[1:] for v in self.variants]
        return out

    def resolve(self, ref: PromptRef) -> PromptPass:
        """The pass a :class:`PromptRef` points at."""
        if ref.control:
            return self.control_pass()
        return self.fact_pass(ref.fact, ref.variant or self.primary_variant)

    @property
    def calibration_passes(self) -> list:
        return [self.resolve(r) for r in self.calibration_prompts]

    @property
    def skip_layer_passes(self) -> list:
        return [self.resolve(r) for r in self.skip_layer_prompts]

    @property
    def temperature_exploration_pass(self) -> PromptPass:
        return self.resolve(self.final_head.temperature_exploration.prompt)

    @property
    def micro_suite_notes(self) -> str:
        """``micro_suite.aggregates.notes`` (reference wording)."""
        return f"control is {self.control.key}; other positives do not add new controls"

    def replace_thresholds(self, **groups) -> "Suite":
        """A copy with threshold fields replaced, e.g. ``replace_thresholds(copy={"soft_threshold": 0.33})``
        (how CLI flags such as ``--copy-soft-thresh`` override the suite)."""
        th = self.thresholds
        new = {}
        for group, changes in groups.items():
            if not hasattr(th, group):
                raise JaxlensError(f"there is no threshold group named {group!r}.")
            cur = getattr(th, group)
            data = {f.name: getattr(cur, f.name) for f in fields(cur)}
            for k, v in dict(changes).items():
                if k not in data:
                    raise JaxlensError(f"threshold group {group!r} has no field {k!r}.")
                data[k] = v
            new[group] = _build_group(type(cur), data, f"thresholds.{group}", "<override>")
        return dataclasses.replace(self, thresholds=dataclasses.replace(th, **new))


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------

_PKG_DIR = Path(__file__).resolve().parents[1]   # the jaxlens package


def suite_search_paths() -> list:
    """Folders searched for a suite given by name: ``$JAXLENS_SUITE_PATH`` entries, the repository's
    ``configs/probe`` and the package's bundled ``jaxlens/configs/probe``."""
    env = [p for p in os.environ.get("JAXLENS_SUITE_PATH", "").split(os.pathsep) if p]
    return [Path(p) for p in env] + [_PKG_DIR.parent / "configs" / "probe", _PKG_DIR / "configs" / "probe"]


def _resolve_path(source) -> Path:
    s = str(source)
    p = Path(os.path.expanduser(s))
    if s.endswith(".toml") or os.sep in s or "/" in s:
        if not p.is_file():
            raise JaxlensError(f"suite file {s} does not exist.")
        return p
    for d in suite_search_paths():
        cand = d / f"{s}.toml"
        if cand.is_file():
            return cand
    raise JaxlensError(f"no suite named {s!r} was found (looked for {s}.toml in "
                       + ", ".join(str(d) for d in suite_search_paths()) + ").")


def load_suite(source="reference") -> Suite:
    """Load and validate a suite: ``"reference"`` (or another name found on :func:`suite_search_paths`)
    or a path to a ``.toml`` file."""
    path = _resolve_path(source)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise JaxlensError(f"{path.name} is not valid TOML ({e}).") from None
    except OSError as e:
        raise JaxlensError(f"suite file {path} cannot be read ({e.strerror}).") from None
    return suite_from_dict(data, where=path.name, source=_portable_source(source, path))


def _portable_source(given, path: Path) -> str:
    """How the outputs name a suite: a bundled one as ``configs/probe/<file>`` (no machine path in a run's
    JSON), a user's file as the user gave it."""
    for d in suite_search_paths()[-2:]:
        try:
            return str(Path("configs", "probe") / path.resolve().relative_to(d.resolve()))
        except ValueError:
            continue
    return str(given)


def suite_from_dict(data: Mapping, *, where: str = "<suite>", source: str = "<dict>") -> Suite:
    """Validate a parsed TOML mapping and build the :class:`Suite` (``where`` names it in errors)."""
    if not isinstance(data, Mapping):
        raise JaxlensError(f"{where}: the suite must be a table.")
    _no_unknown(data, {"suite", "templates", "facts", "control", "runs", "final_head", "records",
                       "thresholds"}, "", where)

    meta = _table(data, "suite", where, required=False)
    _no_unknown(meta, {"name", "description"}, "suite", where)
    default_name = Path(source).stem if source not in ("<dict>", "") else "suite"
    name = _str(meta.get("name", default_name), "suite.name", where)
    description = _str(meta.get("description", ""), "suite.description", where, allow_empty=True)

    # templates
    tpl = _table(data, "templates", where, required=True)
    if not tpl:
        raise JaxlensError(f"{where}: [templates] must define at least one prompt variant.")
    templates = []
    for vname, text in tpl.items():
        text = _str(text, f"templates.{vname}", where)
        if text != text.rstrip():
            raise JaxlensError(f"{where}: templates.{vname} ends with whitespace; prompts must not have a "
                               "trailing space because the probe appends the answer itself.")
        if "{subject}" not in text:
            raise JaxlensError(f"{where}: templates.{vname} has no {{subject}} placeholder.")
        templates.append((str(vname), text))
    variants = [v for v, _ in templates]

    # facts
    raw_facts = data.get("facts")
    if not isinstance(raw_facts, list) or not raw_facts:
        raise JaxlensError(f"{where}: [[facts]] must list at least one fact (subject and answer).")
    facts, seen = [], set()
    for i, rf in enumerate(raw_facts):
        fw = f"facts[{i}]"
        if not isinstance(rf, Mapping):
            raise JaxlensError(f"{where}: {fw} must be a table with subject and answer.")
        subject = _str(rf.get("subject"), f"{fw}.subject", where)
        answer = _str(rf.get("answer"), f"{fw}.answer", where)
        if answer != answer.strip():
            raise JaxlensError(f"{where}: {fw}.answer must not start or end with whitespace.")
        key = _str(rf.get("key", f"{subject}{ARROW}{answer}"), f"{fw}.key", where)
        if key in seen:
            raise JaxlensError(f"{where}: {fw}.key {key!r} repeats an earlier fact.")
        seen.add(key)
        extra = []
        for k, v in rf.items():
            if k in ("subject", "answer", "key"):
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
                raise JaxlensError(f"{where}: {fw}.{k} is not a valid placeholder name.")
            extra.append((str(k), _str(v, f"{fw}.{k}", where)))
        fact = Fact(i, subject, answer, key, tuple(extra))
        for vname, text in templates:
            missing = [m for m in _PLACEHOLDER.findall(text) if m not in fact.placeholders()]
            if missing:
                raise JaxlensError(f"{where}: templates.{vname} uses {{{missing[0]}}}, which {fw} does not "
                                   "define.")
        facts.append(fact)

    # control
    ctl = _table(data, "control", where, required=True)
    _no_unknown(ctl, {"key", "prompt", "subject", "answer", "variant"}, "control", where)
    c_answer = _str(ctl.get("answer"), "control.answer", where)
    if c_answer != c_answer.strip():
        raise JaxlensError(f"{where}: control.answer must not start or end with whitespace.")
    c_variant = _str(ctl.get("variant", variants[0]), "control.variant", where)
    if c_variant not in variants:
        raise JaxlensError(f"{where}: control.variant {c_variant!r} is not one of the templates "
                           f"({', '.join(variants)}).")
    if "prompt" in ctl:
        c_prompt = _str(ctl["prompt"], "control.prompt", where)
        if c_prompt != c_prompt.rstrip():
            raise JaxlensError(f"{where}: control.prompt ends with whitespace; prompts must not have a "
                               "trailing space.")
        c_subject = ctl.get("subject")
        if c_subject is not None:
            _str(c_subject, "control.subject", where)
    elif "subject" in ctl:
        c_subject = _str(ctl["subject"], "control.subject", where)
        c_prompt = _fill(dict(templates)[c_variant], {"subject": c_subject, "answer": c_answer})
        if _PLACEHOLDER.search(c_prompt):
            raise JaxlensError(f"{where}: control.subject cannot fill templates.{c_variant}, which uses "
                               "placeholders other than {subject}; give control.prompt instead.")
    else:
        raise JaxlensError(f"{where}: [control] needs either prompt (exact text) or subject.")
    c_key_default = f"{c_subject}{ARROW}{c_answer}" if c_subject else c_answer
    c_key = _str(ctl.get("key", c_key_default), "control.key", where)
    control = Control(c_key, c_prompt, c_answer, c_variant)

    # runs
    runs = _table(data, "runs", where, required=False)
    _no_unknown(runs, {"calibration_prompts", "skip_layer_prompts"}, "runs", where)
    default_refs = [PromptRef(fact=0, variant=variants[0])]
    if len(variants) > 1:
        default_refs.append(PromptRef(fact=0, variant=variants[1]))
    default_refs.append(PromptRef(control=True))
    calib = _refs(runs.get("calibration_prompts"), "runs.calibration_prompts", where, facts, variants,
                  default_refs)
    skip = _refs(runs.get("skip_layer_prompts"), "runs.skip_layer_prompts", where, facts, variants,
                 default_refs)

    # final head
    fh = _table(data, "final_head", where, required=False)
    _no_unknown(fh, {"final_prediction_top_k", "test_prompts_top_k", "test_prompts",
                     "temperature_exploration"}, "final_head", where)
    tps = fh.get("test_prompts", [])
    if not isinstance(tps, list):
        raise JaxlensError(f"{where}: final_head.test_prompts must be a list of strings.")
    test_prompts = tuple(_str(t, f"final_head.test_prompts[{i}]", where) for i, t in enumerate(tps))
    te = fh.get("temperature_exploration", {})
    if not isinstance(te, Mapping):
        raise JaxlensError(f"{where}: final_head.temperature_exploration must be a table.")
    _no_unknown(te, {"prompt", "temperatures", "top_k"}, "final_head.temperature_exploration", where)
    te_ref = _refs([te["prompt"]], "final_head.temperature_exploration.prompt", where, facts, variants,
                   None)[0] if "prompt" in te else PromptRef(fact=0, variant=variants[0])
    temps = _num_list(te.get("temperatures", [0.1, 2.0]), "final_head.temperature_exploration.temperatures",
                      where, "pos", "float")
    final_head = FinalHeadConfig(
        final_prediction_top_k=_int(fh.get("final_prediction_top_k", 20), "final_head.final_prediction_top_k",
                                    where, "posint"),
        test_prompts_top_k=_int(fh.get("test_prompts_top_k", 10), "final_head.test_prompts_top_k", where,
                                "posint"),
        test_prompts=test_prompts,
        temperature_exploration=TemperatureExploration(
            te_ref, temps, _int(te.get("top_k", 15), "final_head.temperature_exploration.top_k", where,
                                "posint")),
    )

    # records
    rec = _table(data, "records", where, required=False)
    _no_unknown(rec, {"important_words", "top_k_verbose", "top_k_default", "pure_top_k"}, "records", where)
    iw = rec.get("important_words", [])
    if not isinstance(iw, list):
        raise JaxlensError(f"{where}: records.important_words must be a list of strings.")
    records = RecordsConfig(
        important_words=tuple(_str(w, f"records.important_words[{i}]", where) for i, w in enumerate(iw)),
        top_k_verbose=_int(rec.get("top_k_verbose", 20), "records.top_k_verbose", where, "posint"),
        top_k_default=_int(rec.get("top_k_default", 5), "records.top_k_default", where, "posint"),
        pure_top_k=_int(rec.get("pure_top_k", 5), "records.pure_top_k", where, "posint"),
    )

    thresholds = _thresholds(_table(data, "thresholds", where, required=False), where)
    return Suite(name=name, description=description, source=source, templates=tuple(templates),
                 facts=tuple(facts), control=control, calibration_prompts=calib, skip_layer_prompts=skip,
                 final_head=final_head, records=records, thresholds=thresholds)


# -- helpers -----------------------------------------------------------------------------------

def _fill(template: str, values: Mapping) -> str:
    """Literal ``{name}`` substitution (no str.format: other braces are left as they are)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
                            template)


def _table(data: Mapping, key: str, where: str, required: bool) -> Mapping:
    if key not in data:
        if required:
            raise JaxlensError(f"{where}: the [{key}] table is missing.")
        return {}
    v = data[key]
    if not isinstance(v, Mapping):
        raise JaxlensError(f"{where}: {key} must be a table.")
    return v


def _no_unknown(d: Mapping, allowed: Iterable[str], path: str, where: str) -> None:
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            name = f"{path}.{k}" if path else str(k)
            raise JaxlensError(f"{where}: unknown key {name} (allowed here: {', '.join(sorted(allowed))}).")


def _str(v, path: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise JaxlensError(f"{where}: {path} must be a non-empty string.")
    return v


def _check_num(x: float, check: str, path: str, where: str) -> None:
    if not math.isfinite(x):
        raise JaxlensError(f"{where}: {path} must be a finite number, got {x!r}.")
    bad = {"prob": not (0.0 <= x <= 1.0), "pos": not x > 0, "nonneg": not x >= 0,
           "posint": not x >= 1}.get(check, False)
    if bad:
        what = {"prob": "between 0 and 1", "pos": "greater than 0", "nonneg": "at least 0",
                "posint": "at least 1"}[check]
        raise JaxlensError(f"{where}: {path} must be {what}, got {x!r}.")


def _num(v, path: str, where: str, check: str = "any") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise JaxlensError(f"{where}: {path} must be a number, got {v!r}.")
    _check_num(float(v), check, path, where)
    return float(v)


def _int(v, path: str, where: str, check: str = "any") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise JaxlensError(f"{where}: {path} must be an integer, got {v!r}.")
    _check_num(float(v), check, path, where)
    return int(v)


def _num_list(v, path: str, where: str, check: str, elem: str) -> tuple:
    if not isinstance(v, list):
        raise JaxlensError(f"{where}: {path} must be a list of numbers.")
    conv = _int if elem == "int" else _num
    return tuple(conv(x, f"{path}[{i}]", where, check) for i, x in enumerate(v))


def _refs(v, path: str, where: str, facts, variants, default) -> tuple:
    if v is None:
        return tuple(default)
    if not isinstance(v, list):
        raise JaxlensError(f"{where}: {path} must be a list of prompt references.")
    out = []
    for i, r in enumerate(v):
        p = f"{path}[{i}]" if default is not None else path
        if not isinstance(r, Mapping):
            raise JaxlensError(f"{where}: {p} must be {{ fact = N, variant = \"name\" }} or {{ control = true }}.")
        _no_unknown(r, {"fact", "variant", "control"}, p, where)
        if r.get("control") is True:
            if "fact" in r or "variant" in r:
                raise JaxlensError(f"{where}: {p} cannot name both the control and a fact.")
            out.append(PromptRef(control=True))
            continue
        if "control" in r and r["control"] is not False:
            raise JaxlensError(f"{where}: {p}.control must be true or false.")
        fi = _int(r.get("fact"), f"{p}.fact", where, "nonneg") if "fact" in r else None
        if fi is None:
            raise JaxlensError(f"{where}: {p} needs fact = <index> or control = true.")
        if fi >= len(facts):
            raise JaxlensError(f"{where}: {p}.fact = {fi} but the suite has only {len(facts)} facts.")
        var = _str(r.get("variant", variants[0]), f"{p}.variant", where)
        if var not in variants:
            raise JaxlensError(f"{where}: {p}.variant {var!r} is not one of the templates ({', '.join(variants)}).")
        out.append(PromptRef(fact=fi, variant=var))
    return tuple(out)


def _build_group(cls, data: Mapping, path: str, where: str):
    known = {f.name: f for f in fields(cls)}
    _no_unknown(data, known, path, where)
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        check = f.metadata.get("check", "any")
        p = f"{path}.{name}"
        if "elem" in f.metadata:
            if isinstance(value, tuple):
                value = list(value)
            kwargs[name] = _num_list(value, p, where, check, f.metadata["elem"])
        elif isinstance(f.default, bool):  # pragma: no cover - no boolean thresholds yet
            kwargs[name] = bool(value)
        elif isinstance(f.default, int):
            kwargs[name] = _int(value, p, where, check)
        else:
            kwargs[name] = _num(value, p, where, check)
    obj = cls(**kwargs)
    if cls is CopyThresholds:
        if not obj.soft_window_ks:
            raise JaxlensError(f"{where}: {path}.soft_window_ks must list at least one window size.")
        if not obj.strict_sweep:
            raise JaxlensError(f"{where}: {path}.strict_sweep must list at least one threshold.")
    return obj


def _thresholds(th: Mapping, where: str) -> Thresholds:
    groups = {f.name: f for f in fields(Thresholds)}
    _no_unknown(th, groups, "thresholds", where)
    kwargs = {}
    for name, value in th.items():
        if not isinstance(value, Mapping):
            raise JaxlensError(f"{where}: thresholds.{name} must be a table.")
        cls = type(groups[name].default_factory())
        kwargs[name] = _build_group(cls, value, f"thresholds.{name}", where)
    return Thresholds(**kwargs)
