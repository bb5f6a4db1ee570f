"""jaxlens.probe.suite: the reference suite is the data of spec §1.2 / §2, user suites load, and every bad
suite fails with one clear sentence naming the file and the field."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jaxlens.probe import metrics as M
from jaxlens.errors import JaxlensError
from jaxlens.probe.suite import ARROW, PromptRef, Thresholds, load_suite, suite_from_dict
from reference_data import HEADERS_JSON, MILESTONES_CSV, PURE_CSV, REF_DIR, SKELETON  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

ORIG = "Give the city name only, plain text. The capital of {} is called simply"
NOFILL = "Give the city name only, plain text. The capital of {} is called"
TEST_PROMPTS = [
    "Berlin is the capital of", "Germany's capital city is called simply",
    "The capital city of Germany is named simply", "Germany has its capital at the city called simply",
    "In Germany the capital city is simply", "Germany's capital city is called",
    "The capital city of Germany is named", "Germany has its capital at", "In Germany the capital city is known as",
    "Give the country name only, plain text. Berlin is the capital of",
    "Give the city name only, plain text. Germany's capital city is called",
    "Give the city name only, plain text. The capital city of Germany is named simply",
    "Give the city name only, plain text. Germany has its capital at",
    "Give the city name only, plain text. In Germany, the capital city is known as",
]


def test_reference_suite_is_spec_1_2():
    s = load_suite("reference")
    assert s.name == "reference" and s.variants == ("orig", "no_filler")
    assert s.primary_variant == "orig" and s.ablation_variant == "no_filler"
    facts = [("Germany", "Berlin"), ("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Canada", "Ottawa")]
    assert [(f.subject, f.answer) for f in s.facts] == facts
    assert s.fact_keys == [f"{a}{ARROW}{b}" for a, b in facts] == [
        "Germany\u2192Berlin", "France\u2192Paris", "Italy\u2192Rome", "Japan\u2192Tokyo", "Canada\u2192Ottawa"]
    passes = s.passes()
    assert len(passes) == 11
    exp = [(("pos", v, f"{a}{ARROW}{b}", i), (ORIG if v == "orig" else NOFILL).format(a), b)
           for i, (a, b) in enumerate(facts) for v in ("orig", "no_filler")]
    exp.append((("ctl", "orig", None, None), ORIG.format("France"), "Paris"))
    assert [((p.prompt_id, p.variant, p.fact_key, p.fact_index), p.text, p.answer) for p in passes] == exp
    assert s.primary.text == ORIG.format("Germany") and s.primary.answer == "Berlin"
    assert s.control_pass().text == passes[2].text      # Q18: the control duplicates France orig
    assert s.control.key == "France\u2192Paris"
    assert s.micro_suite_notes == "control is France\u2192Paris; other positives do not add new controls"
    order = [(p.prompt_id, p.variant, p.fact_index) for p in s.gold_alignment_order()]
    assert order == [("pos", "orig", 0), ("ctl", "orig", None), ("pos", "no_filler", 0)] + [
        ("pos", v, i) for i in range(1, 5) for v in ("orig", "no_filler")]
    assert [p.text for p in s.calibration_passes] == [ORIG.format("Germany"), NOFILL.format("Germany"),
                                                      ORIG.format("France")]
    assert [(p.text, p.answer) for p in s.skip_layer_passes] == [
        (ORIG.format("Germany"), "Berlin"), (NOFILL.format("Germany"), "Berlin"), (ORIG.format("France"), "Paris")]
    fh = s.final_head
    assert list(fh.test_prompts) == TEST_PROMPTS
    assert (fh.final_prediction_top_k, fh.test_prompts_top_k) == (20, 10)
    assert fh.temperature_exploration.temperatures == (0.1, 2.0) and fh.temperature_exploration.top_k == 15
    assert s.temperature_exploration_pass.text == ORIG.format("Germany")
    assert s.records.important_words == ("Germany", "Berlin", "capital", "Answer", "word", "simply")
    assert (s.records.top_k_verbose, s.records.top_k_default, s.records.pure_top_k) == (20, 5, 5)
    for p in passes:
        assert p.text == p.text.rstrip()                      # no trailing space


def test_reference_thresholds_are_the_spec_values():
    th = load_suite("reference").thresholds
    assert th == Thresholds()                                 # the TOML and the dataclass defaults agree
    c = th.copy
    assert (c.strict_threshold, c.strict_margin, c.strict_window_k) == (0.95, 0.10, 1)
    assert c.strict_sweep == (0.7, 0.8, 0.9, 0.95)
    assert (c.soft_threshold, c.soft_window_ks, c.soft_extra_thresholds) == (0.5, (1, 2, 3), ())
    assert c.window_max == 3
    sem = th.semantic
    assert (sem.entropy_collapse_bits, sem.margin_delta_abs, sem.top2_delta_logit) == (1.0, 0.002, 0.5)
    assert (sem.rank_milestones, sem.kl_milestones, sem.confirm_window) == ((1, 5, 10), (0.5, 1.0), 2)
    su = th.surface
    assert (su.surface_delta, su.geom_gamma, su.topk_prompt_k, su.topk_prompt_tau) == (0.05, 0.02, 50, 0.33)
    assert su.cos_milestones == (0.2, 0.4, 0.6)
    assert th.control.delta_top2_logit == 0.5
    assert (th.last_layer.warn_kl_bits, th.norm_temperature.grid_min, th.norm_temperature.grid_max) == (0.25, 0.2, 5.0)
    assert th.gate_stability.scales == (0.9, 0.95, 1.05, 1.1)
    assert th.artifact_score.weight_pct_kl_ge_1 == 0.6 and th.raw_lens.window_radius == 4
    assert th.gold.pieces_k == 4


def test_copy_flag_columns_match_reference_header():
    headers = json.loads((REF_DIR / "csv-headers.json").read_text())
    pure = headers["-pure-next-token.csv"]
    i = pure.index("copy_collapse") + 1
    cols = M.copy_flag_columns(load_suite("reference").thresholds.copy)
    assert pure[i:i + len(cols)] == cols
    assert pure[i + len(cols)] == "entropy_collapse"


USER_TOML = """
[suite]
name = "de-capitals"

[templates]
orig = "Nenne nur die Stadt. Die Hauptstadt von {subject} ({code}) heißt"
kurz = "Die Hauptstadt von {subject} heißt"

[[facts]]
subject = "Deutschland"
answer = "Berlin"
code = "DE"

[[facts]]
subject = "Österreich"
answer = "Wien"
code = "AT"
key = "AT-Wien"

[control]
subject = "Frankreich"
answer = "Paris"
variant = "kurz"

[final_head.temperature_exploration]
prompt = { fact = 1, variant = "kurz" }
temperatures = [0.5]

[thresholds.copy]
soft_threshold = 0.33
soft_extra_thresholds = [0.9]

[thresholds.semantic]
rank_milestones = [1, 3]
"""


def test_user_suite(tmp_path, monkeypatch):
    p = tmp_path / "de.toml"
    p.write_text(USER_TOML, encoding="utf-8")
    s = load_suite(p)
    assert s.name == "de-capitals" and s.variants == ("orig", "kurz")
    assert s.prompt_text(0, "orig") == "Nenne nur die Stadt. Die Hauptstadt von Deutschland (DE) heißt"
    assert s.fact_keys == ["Deutschland\u2192Berlin", "AT-Wien"]
    assert s.control.prompt == "Die Hauptstadt von Frankreich heißt" and s.control.key == "Frankreich\u2192Paris"
    assert s.control_pass().variant == "kurz"
    assert len(s.passes()) == 5 and s.passes()[-1].prompt_id == "ctl"
    assert s.calibration_prompts == (PromptRef(fact=0, variant="orig"), PromptRef(fact=0, variant="kurz"),
                                     PromptRef(control=True))
    assert s.temperature_exploration_pass.text == "Die Hauptstadt von Österreich heißt"
    assert s.final_head.test_prompts == () and s.records.important_words == ()
    assert s.thresholds.copy.soft_threshold == 0.33 and s.thresholds.copy.strict_threshold == 0.95
    assert s.thresholds.semantic.rank_milestones == (1, 3)
    assert M.copy_flag_columns(s.thresholds.copy)[4:] == [
        "copy_soft_k1@0.33", "copy_soft_k2@0.33", "copy_soft_k3@0.33",
        "copy_soft_k1@0.9", "copy_soft_k2@0.9", "copy_soft_k3@0.9"]
    assert load_suite(str(p)).facts == s.facts
    # by name through $JAXLENS_SUITE_PATH
    monkeypatch.setenv("JAXLENS_SUITE_PATH", str(tmp_path))
    assert load_suite("de").name == "de-capitals"


def test_replace_thresholds():
    s = load_suite("reference")
    s2 = s.replace_thresholds(copy={"soft_threshold": 0.33, "soft_window_ks": [1, 2]})
    assert s2.thresholds.copy.soft_threshold == 0.33 and s2.thresholds.copy.soft_window_ks == (1, 2)
    assert s.thresholds.copy.soft_threshold == 0.5                # frozen original untouched
    with pytest.raises(JaxlensError, match="soft_threshold must be between 0 and 1"):
        s.replace_thresholds(copy={"soft_threshold": 1.5})
    with pytest.raises(JaxlensError, match="has no field 'nope'"):
        s.replace_thresholds(copy={"nope": 1})
    with pytest.raises(JaxlensError, match="no threshold group named 'bogus'"):
        s.replace_thresholds(bogus={})


def _base() -> dict:
    return {"templates": {"orig": "The capital of {subject} is"},
            "facts": [{"subject": "Germany", "answer": "Berlin"}],
            "control": {"prompt": "The capital of France is", "answer": "Paris"}}


def _mut(fn):
    d = json.loads(json.dumps(_base()))
    fn(d)
    return d


BAD = [
    (lambda d: d.pop("templates"), "the [templates] table is missing"),
    (lambda d: d.update(templates={}), "must define at least one prompt variant"),
    (lambda d: d["templates"].update(orig="The capital is"), "templates.orig has no {subject} placeholder"),
    (lambda d: d["templates"].update(orig="The capital of {subject} is "), "templates.orig ends with whitespace"),
    (lambda d: d["templates"].update(orig="{subject} {city} is"), "templates.orig uses {city}, which facts[0]"),
    (lambda d: d.update(facts=[]), "[[facts]] must list at least one fact"),
    (lambda d: d["facts"][0].pop("answer"), "facts[0].answer must be a non-empty string"),
    (lambda d: d["facts"][0].update(answer=" Berlin"), "facts[0].answer must not start or end with whitespace"),
    (lambda d: d["facts"].append({"subject": "Germany", "answer": "Berlin"}), "facts[1].key"),
    (lambda d: d["facts"][0].update({"bad-name": "x"}), "facts[0].bad-name is not a valid placeholder name"),
    (lambda d: d.pop("control"), "the [control] table is missing"),
    (lambda d: d["control"].pop("prompt"), "[control] needs either prompt"),
    (lambda d: d["control"].update(variant="nope"), "control.variant 'nope' is not one of the templates"),
    (lambda d: d["control"].update(colour="red"), "unknown key control.colour"),
    (lambda d: d.update(extra=1), "unknown key extra"),
    (lambda d: d.update(runs={"calibration_prompts": [{"fact": 3}]}),
     "runs.calibration_prompts[0].fact = 3 but the suite has only 1 facts"),
    (lambda d: d.update(runs={"calibration_prompts": [{"fact": 0, "variant": "x"}]}),
     "runs.calibration_prompts[0].variant 'x' is not one of the templates"),
    (lambda d: d.update(runs={"skip_layer_prompts": [{"control": True, "fact": 0}]}),
     "cannot name both the control and a fact"),
    (lambda d: d.update(runs={"skip_layer_prompts": ["control"]}), "runs.skip_layer_prompts[0] must be"),
    (lambda d: d.update(thresholds={"copy": {"strict_threshold": 1.2}}),
     "thresholds.copy.strict_threshold must be between 0 and 1, got 1.2"),
    (lambda d: d.update(thresholds={"copy": {"strict_threshold": "high"}}),
     "thresholds.copy.strict_threshold must be a number"),
    (lambda d: d.update(thresholds={"copy": {"soft_window_ks": [1, 0]}}),
     "thresholds.copy.soft_window_ks[1] must be at least 1"),
    (lambda d: d.update(thresholds={"copy": {"soft_window_ks": [1.5]}}),
     "thresholds.copy.soft_window_ks[0] must be an integer"),
    (lambda d: d.update(thresholds={"copy": {"soft_window_ks": []}}), "soft_window_ks must list at least one"),
    (lambda d: d.update(thresholds={"copy": {"stric_threshold": 0.9}}), "unknown key thresholds.copy.stric_threshold"),
    (lambda d: d.update(thresholds={"semantics": {}}), "unknown key thresholds.semantics"),
    (lambda d: d.update(thresholds={"semantic": {"margin_delta_abs": True}}),
     "thresholds.semantic.margin_delta_abs must be a number"),
    (lambda d: d.update(final_head={"temperature_exploration": {"temperatures": [0.0]}}),
     "temperatures[0] must be greater than 0"),
    (lambda d: d.update(records={"important_words": "Germany"}), "records.important_words must be a list"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_suites_fail_with_one_sentence(mutate, message):
    with pytest.raises(JaxlensError) as ei:
        suite_from_dict(_mut(mutate), where="my.toml")
    text = str(ei.value)
    assert text.startswith("my.toml: ") and message in text
    assert "\n" not in text


def test_minimal_dict_suite_gets_defaults():
    s = suite_from_dict(_base())
    assert s.thresholds == Thresholds() and s.final_head.final_prediction_top_k == 20
    assert [p.prompt_id for p in s.passes()] == ["pos", "ctl"]
    assert s.calibration_prompts == (PromptRef(fact=0, variant="orig"), PromptRef(control=True))
    assert s.ablation_variant is None
    assert dataclasses.is_dataclass(s) and s.control.key == "Paris"


def test_file_errors(tmp_path):
    with pytest.raises(JaxlensError, match="suite file .*nope.toml does not exist"):
        load_suite(tmp_path / "nope.toml")
    with pytest.raises(JaxlensError, match="no suite named 'no-such-suite' was found"):
        load_suite("no-such-suite")
    bad = tmp_path / "bad.toml"
    bad.write_text("[templates\norig = 1\n", encoding="utf-8")
    with pytest.raises(JaxlensError, match=r"bad.toml is not valid TOML"):
        load_suite(bad)
    assert (REPO / "configs" / "probe" / "reference.toml").is_file()
