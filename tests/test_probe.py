"""The probe pipeline against an independent PyTorch computation of the spec formulas (spec/probe.md §2).

For tiny checkpoints (Qwen3 without BOS, Llama with a BOS-prepending tokenizer) the Germany pass's pure
next-token rows are recomputed in float64 from the transformers model's own norm lens (block l's input
norm / the final norm, then lm_head) and compared column by column. Also: CSV headers, JSON sections, and
two runs writing byte-identical files.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

import hf_factory as F
from reference_data import HEADERS_JSON, MILESTONES_CSV, PURE_CSV, REF_DIR, SKELETON  # noqa: F401



def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def probed(request, tmp_path_factory):
    from jaxlens.probe.pipeline import run_probe

    name = request.param
    path = str(tmp_path_factory.mktemp(f"probe-{name}"))
    tm = F.build_checkpoint(name, path, seed=zlib.crc32(name.encode()) % 1000 + 11)
    res = run_probe(path, out_dir=None)
    return dict(name=name, path=path, torch_model=tm, result=res)


def _torch_pure(tm, tok, prompt, answer_id, prompt_vocab):
    """Spec §2 metrics for each layer at the last position, from the torch model, in float64."""
    import torch

    from jaxlens.probe.gold import model_input_ids

    ids = np.asarray(model_input_ids(tok, prompt))[None]
    ref = F.torch_reference(tm, ids)
    z = ref["norm_lens_logits"][:, 0, -1].astype(np.float64)              # [L+1, V]
    zf = ref["logits"][0, -1].astype(np.float64)
    lp, lq = _log_softmax(z), _log_softmax(zf)
    p, q = np.exp(lp), np.exp(lq)
    out = {"_zmax": float(np.abs(z).max())}
    out["entropy_bits"] = -(p * lp).sum(-1) / np.log(2)
    out["kl_to_final_bits"] = (p * (lp - lq[None])).sum(-1) / np.log(2)
    out["teacher_entropy_bits"] = np.full(len(z), -(q * lq).sum() / np.log(2))
    srt = np.sort(p, -1)[:, ::-1]
    out["p_top1"], out["p_top5"] = srt[:, 0], srt[:, :5].sum(-1)
    out["p_answer"] = p[:, answer_id]
    out["answer_rank"] = 1 + (z > z[:, [answer_id]]).sum(-1)
    out["answer_minus_uniform"] = p[:, answer_id] - 1.0 / z.shape[-1]
    out["rest_mass"] = np.maximum(0.0, 1 - srt[:, :5].sum(-1))
    for k in range(5):
        out[f"prob{k + 1}"] = srt[:, k]
    # cosines (§2.2, §2.7): geometry vector = the normalised residual the lens decodes
    with torch.no_grad():
        W = tm.get_output_embeddings().weight.double().numpy().T                # [d, V]
    hn = _torch_normed(tm, ids)                                                 # [L+1, d]
    v = hn @ W
    fdir = zf / (np.linalg.norm(zf) + 1e-12)
    out["cos_to_final"] = (v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)) @ fdir

    def cos(a, b):
        return (a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12)) @ (b / (np.linalg.norm(b) + 1e-12))

    out["cos_to_answer"] = cos(hn, W[:, answer_id])
    out["cos_to_prompt_max"] = np.max(np.stack([cos(hn, W[:, t]) for t in prompt_vocab]), 0)
    pv = list(dict.fromkeys(prompt_vocab))
    out["echo_mass_prompt"] = p[:, pv].sum(-1)
    out["answer_mass"] = p[:, answer_id]
    out["answer_minus_echo_mass"] = out["answer_mass"] - out["echo_mass_prompt"]
    out["mass_ratio_ans_over_prompt"] = out["answer_mass"] / (out["echo_mass_prompt"] + 1e-9)
    top50 = np.argsort(-z, -1, kind="stable")[:, :50]
    out["topk_prompt_mass@50"] = np.array([p[i, [t for t in top50[i] if t in set(pv)]].sum() for i in range(len(z))])
    zs = np.sort(z, -1)[:, ::-1]
    rank1 = out["answer_rank"] == 1
    out["answer_logit_gap"] = np.where(rank1, z[:, answer_id] - zs[:, 1], np.nan)
    out["answer_vs_top1_gap"] = np.where(~rank1, z[:, answer_id] - zs[:, 0], np.nan)
    return out


def _torch_normed(tm, ids):
    import torch

    layers, in_norms, final_norm, _ = F._parts(tm)
    caught = {}
    h = layers[-1].register_forward_hook(
        lambda m, i, o: caught.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = tm(torch.as_tensor(ids), output_hidden_states=True)
        h.remove()
        hs = list(out.hidden_states[:-1]) + [caught["x"]]
        n = len(layers)
        rows = []
        for layer, x in enumerate(hs):
            norm = final_norm if layer == n else in_norms[layer]
            rows.append((norm(x) if norm is not None else x)[0, -1].double().numpy())
    return np.stack(rows)


NUMERIC = ["entropy_bits", "kl_to_final_bits", "teacher_entropy_bits", "p_top1", "p_top5", "p_answer",
           "answer_minus_uniform", "rest_mass", "prob1", "prob2", "prob3", "prob4", "prob5", "cos_to_final",
           "cos_to_answer", "cos_to_prompt_max", "echo_mass_prompt", "answer_mass", "answer_minus_echo_mass",
           "mass_ratio_ans_over_prompt", "topk_prompt_mass@50", "answer_logit_gap", "answer_vs_top1_gap"]


def test_germany_pure_rows_match_torch(probed):
    import jaxlens
    from jaxlens.probe import metrics as M
    from jaxlens.probe.gold import token_decoder

    res = probed["result"]
    model = jaxlens.load_model(probed["path"])
    tok = model.tokenizer
    prim = res.passes[0]
    assert prim.inp.spec.fact_key == "Germany→Berlin" and prim.inp.spec.variant == "orig"
    gid = prim.inp.gold.first_id
    assert gid is not None
    if probed["name"] == "llama":            # the BOS-prepending tokenizer
        assert prim.inp.input_ids[0] == tok.bos_token_id and prim.inp.ctx_ids[0] != tok.bos_token_id
    pv = M.prompt_vocab(prim.inp.ctx_ids, token_decoder(tok))
    ref = _torch_pure(probed["torch_model"], tok, prim.inp.spec.text, gid, pv)
    rows = [r for r in res.pure_rows if r["fact_key"] == "Germany→Berlin" and r["prompt_variant"] == "orig"]
    assert [r["layer"] for r in rows] == list(range(model.spec.n_layers + 1))
    for col in NUMERIC:
        ours = np.array([np.nan if r[col] is None else r[col] for r in rows], np.float64)
        exp = ref[col]
        assert np.array_equal(np.isnan(ours), np.isnan(exp)), col
        ok = ~np.isnan(exp)
        # 1e-5 relative, or the fp32 rounding of logits of this size (probabilities inherit |Δz|)
        rel = max(1e-5, 8 * np.finfo(np.float32).eps * ref["_zmax"])
        scale = rel * np.maximum(1.0, np.abs(exp[ok])) if col.endswith("_gap") else rel * np.abs(exp[ok])
        # quantities that cancel (entropy = lse - E[z], KL, differences, cosines) get an absolute floor of
        # fp32 cancellation size; probabilities and masses are compared relatively
        atol = 2e-6 if col.startswith(("entropy", "teacher", "kl", "cos", "answer_minus", "rest_mass")) else 1e-9
        assert np.all(np.abs(ours[ok] - exp[ok]) <= np.maximum(scale, atol)), (col, ours, exp)
    np.testing.assert_array_equal([r["answer_rank"] for r in rows], ref["answer_rank"])
    np.testing.assert_array_equal([r["is_answer"] for r in rows], ref["answer_rank"] == 1)


def test_csv_headers_and_json_sections(probed, tmp_path):
    from jaxlens.probe.pipeline import write_outputs
    from jaxlens.writers import header

    res = probed["result"]
    paths = write_outputs(res, str(tmp_path))
    name = os.path.basename(probed["path"])
    files = sorted(os.path.basename(p) for p in paths)
    kinds = ["records", "pure-next-token", "pure-next-token-rawlens", "pure-next-token-rawlens-window", "milestones",
             "artifact-audit"]
    assert files == sorted([f"output-{name}.json"] + [f"output-{name}-{k}.csv" for k in kinds])
    import csv

    ref_headers = json.loads(HEADERS_JSON.read_text(encoding="utf-8"))
    for key in kinds:
        with open(tmp_path / f"output-{name}-{key}.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == header(key)
        assert rows[0] == ref_headers[f"-{key}.csv"], key
        assert all(len(r) == len(rows[0]) for r in rows), key
    n = res.json["model_stats"]["num_layers"]
    with open(tmp_path / f"output-{name}-pure-next-token-rawlens.csv", encoding="utf-8") as fh:
        assert sum(1 for _ in fh) - 1 == 11 * (n + 1)
    with open(tmp_path / f"output-{name}-milestones.csv", encoding="utf-8") as fh:
        assert sum(1 for _ in fh) - 1 == 4
    with open(tmp_path / f"output-{name}-artifact-audit.csv", encoding="utf-8") as fh:
        assert sum(1 for _ in fh) - 1 == 1 + (n + 1)
    with open(tmp_path / f"output-{name}-pure-next-token.csv", encoding="utf-8") as fh:
        n_pure = sum(1 for _ in fh) - 1
    assert n_pure == 11 * (res.json["model_stats"]["num_layers"] + 1)
    doc = json.loads((tmp_path / f"output-{name}.json").read_text(encoding="utf-8"))
    skel = REF_DIR / "output-Qwen3-14B.skeleton.json"
    if skel.exists():
        ref = json.loads(skel.read_text(encoding="utf-8"))
        feature_keys = ["prompt", "test_prompts", "temperature_exploration", "diagnostics", "final_prediction",
                        "model_stats", "raw_lens_check", "prompts", "provenance", "copy_flag_columns",
                        "ablation_summary", "control_prompt", "control_summary", "tuned_lens", "summary",
                        "micro_suite", "measurement_guidance", "evaluation_pack", "gold_answer"]
        assert list(doc) == list(ref)                 # top-level keys, in the reference order
        for k in feature_keys:
            assert k in doc, k
            if isinstance(ref[k], dict) and k not in ("tuned_lens", "provenance"):
                missing = set(ref[k]) - set(doc[k])
                if k == "diagnostics":               # tuned-lens keys come with tuned-lens support
                    missing -= DIAGNOSTICS_LATER
                assert not missing, (k, sorted(missing))
        # diagnostics keys in the reference order (jaxlens extras such as tau_norm_calibration interleave)
        common = [k for k in ref["diagnostics"] if k in doc["diagnostics"]]
        assert [k for k in doc["diagnostics"] if k in set(common)] == common
        for k in ("raw_lens_full", "raw_lens_window", "decoding_point", "last_layer_consistency", "numeric_health",
                  "repeatability", "repeatability_forward", "normalization_provenance", "norm_trajectory",
                  "gate_stability_small_scale", "confirmed_semantics", "config", "position_window"):
            missing = set(ref["diagnostics"][k]) - set(doc["diagnostics"][k] or {})
            assert not missing, (k, sorted(missing))
        for k in ("evaluation_pack", "measurement_guidance", "raw_lens_check"):
            assert not set(ref[k]) - set(doc[k]), k
    from jaxlens.writers import copy_flag_columns

    assert doc["copy_flag_columns"] == copy_flag_columns()


# diagnostics keys still missing: those that exist only when a tuned lens is loaded (tuned-lens support)
DIAGNOSTICS_LATER = {
    "L_surface_to_meaning_tuned", "answer_mass_at_L_surface_tuned", "echo_mass_at_L_surface_tuned", "L_geom_tuned",
    "cos_to_answer_at_L_geom_tuned", "cos_to_prompt_max_at_L_geom_tuned", "L_topk_decay_tuned",
    "topk_prompt_mass_at_L_tuned", "topk_prompt_tau_tuned", "surface_delta_tuned", "geom_gamma_tuned",
    "skip_layers_sanity", "tuned_lens_regression",
}


def test_two_runs_are_byte_identical(probed, tmp_path):
    from jaxlens.probe.pipeline import run_probe

    a, b = tmp_path / "a", tmp_path / "b"
    run_probe(probed["path"], out_dir=str(a))
    run_probe(probed["path"], out_dir=str(b))
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) == 7
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
