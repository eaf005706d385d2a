//! The model against `transformers`: logits, completion log-probs and gradients for tiny random Llama
//! (GQA, tied embeddings) and Qwen2 (q/k/v biases, untied head, sharded checkpoint) models, GPT-2 (Conv1D,
//! learned positions, tied head) and GPT-NeoX (parallel and sequential residual, partial rotary, fused
//! per-head qkv, untied `embed_out`), greedy generation for the last two, and the tokenizer's ids.
//! Fixtures: `tests/fixtures/parity.json` (`scripts/make_fixtures.py`) and `parity_families.json`
//! (`scripts/make_family_fixtures.py`).

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::{close, fixture_json, fixtures};
use prospect::model::{completion_logps, sequence_logps, sequence_logps_composite, HfTokenizer, Policy};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn matrix_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

/// Runs the fixture batch through the model; returns (max |Δlogit| over real tokens, logps, counts,
/// gradients of Σ logps by parameter name).
/// Which way logits become log-probs: the fused kernel on full logits (what `run` used to test), the
/// composite reference on full logits, or the training path's LM head on completion positions only.
#[derive(Clone, Copy, Debug)]
enum Path {
    Fused,
    Composite,
    CompletionOnly,
}

fn run(name: &str) -> (f64, Vec<f64>, Vec<usize>, BTreeMap<String, Tensor>, Value) {
    run_path(name, Path::Fused)
}

fn run_path(name: &str, path: Path) -> (f64, Vec<f64>, Vec<usize>, BTreeMap<String, Tensor>, Value) {
    let fixture = parity_fixture(name);
    let dev = Device::Cpu;
    let (policy, unused) = Policy::load(&fixtures().join(name), &dev).unwrap();
    assert!(unused.is_empty(), "unused tensors: {unused:?}");
    let model = policy.model(&dev).unwrap();
    let ids = matrix_u32(&fixture["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    let input_ids = Tensor::new(ids.clone(), &dev).unwrap();
    let mask: Vec<Vec<f32>> = matrix_u32(&fixture["completion_mask"])
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as f32).collect())
        .collect();
    let completion_mask = Tensor::new(mask, &dev).unwrap();
    let attention = matrix_u32(&fixture["attention_mask"]);

    let logits = model.forward(&input_ids).unwrap(); // [b, t, v]
    let got: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let want = fixture["logits"].as_array().unwrap();
    let mut max_diff = 0f64;
    for bi in 0..b {
        for ti in 0..t {
            if attention[bi][ti] == 0 {
                continue; // padded positions are implementation-defined
            }
            for (g, w) in got[bi][ti].iter().zip(floats(&want[bi][ti])) {
                max_diff = max_diff.max((*g as f64 - w).abs());
            }
        }
    }
    let out = match path {
        Path::Fused => sequence_logps(&logits, &input_ids, &completion_mask).unwrap(),
        Path::Composite => sequence_logps_composite(&logits, &input_ids, &completion_mask).unwrap(),
        Path::CompletionOnly => {
            drop(logits);
            completion_logps(&model, &input_ids, &completion_mask).unwrap()
        }
    };
    let logps: Vec<f64> = out.logps.to_vec1::<f32>().unwrap().into_iter().map(|x| x as f64).collect();
    let grads_store = out.logps.sum_all().unwrap().backward().unwrap();
    let grads = policy
        .params
        .iter()
        .filter_map(|(n, v)| grads_store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect();
    (max_diff, logps, out.token_counts, grads, fixture)
}

/// The GPT-2 / GPT-NeoX models are in their own fixture file.
const FAMILIES: [&str; 3] = ["tiny-gpt2", "tiny-gpt-neox", "tiny-gpt-neox-seq"];

fn parity_fixture(name: &str) -> Value {
    let file = if FAMILIES.contains(&name) { "parity_families.json" } else { "parity.json" };
    fixture_json(file)[name].clone()
}

/// transformers 5 calls GPT-NeoX's head `lm_head` in memory and `embed_out` in the checkpoint.
fn checkpoint_name(pname: &str) -> &str {
    if pname == "lm_head.weight" {
        "embed_out.weight"
    } else {
        pname
    }
}

fn check(name: &str) {
    check_path(name, Path::Fused)
}

fn check_path(name: &str, path: Path) {
    let (max_diff, logps, counts, grads, fixture) = run_path(name, path);
    assert!(max_diff < 1e-4, "{name}: largest logit difference vs transformers: {max_diff:e}");
    let want_counts: Vec<usize> =
        fixture["token_count"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    assert_eq!(counts, want_counts);
    for (g, w) in logps.iter().zip(floats(&fixture["logps_sum"])) {
        assert!(close(*g, w, 1e-5, 1e-4), "{name}: logps {g} vs transformers {w}");
    }
    // Gradients of Σ logps: every parameter, by L2 norm and sum; two parameters in full.
    let want = fixture["grads"].as_object().unwrap();
    assert_eq!(grads.len(), want.len(), "{name}: parameters with a gradient: {:?}", grads.keys().collect::<Vec<_>>());
    for (pname, w) in want {
        let pname = match FAMILIES.contains(&name) {
            true => checkpoint_name(pname),
            false => pname.as_str(),
        };
        let g = grads.get(pname).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
        let l2 = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        let sum = g.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(l2 > 0.0, "{name}: zero gradient for {pname}");
        assert!(
            close(l2, w["l2_norm"].as_f64().unwrap(), 1e-4, 1e-5),
            "{name} {pname}: grad l2 {l2} vs {}",
            w["l2_norm"]
        );
        assert!(close(sum, w["sum"].as_f64().unwrap(), 1e-3, 1e-3), "{name} {pname}: grad sum {sum} vs {}", w["sum"]);
    }
    for (pname, w) in fixture["grads_full"].as_object().unwrap() {
        let g: Vec<f32> = grads[pname].flatten_all().unwrap().to_vec1().unwrap();
        let want = floats(&w["values"]);
        let worst = g.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(worst < 1e-3, "{name} {pname}: largest gradient difference {worst:e}");
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny-llama");
}

#[test]
fn tiny_qwen2_sharded_matches_transformers() {
    check("tiny-qwen2");
}

#[test]
fn tiny_gpt2_matches_transformers() {
    check("tiny-gpt2");
}

#[test]
fn tiny_gpt_neox_parallel_residual_matches_transformers() {
    check("tiny-gpt-neox");
}

#[test]
fn tiny_gpt_neox_sequential_residual_matches_transformers() {
    check("tiny-gpt-neox-seq");
}

#[test]
fn greedy_generation_matches_transformers_for_gpt2_and_gpt_neox() {
    use prospect::eval::{generate, FinishReason, GenerateConfig};
    for name in FAMILIES {
        let dir = fixtures().join(name);
        let (policy, _) = Policy::load(&dir, &Device::Cpu).unwrap();
        let model = policy.frozen_model(&Device::Cpu).unwrap();
        let tok = HfTokenizer::load(&dir).unwrap();
        let cases = parity_fixture(name)["greedy"].as_array().unwrap().clone();
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        let config = GenerateConfig { max_new_tokens: 8, ..GenerateConfig::default() }; // greedy by default
                                                                                        // Both prompts in one left-padded batch: each row's positions start at its first real token.
        let out = generate(&model, &tok, &prompts, &config, &Device::Cpu, &mut |_| {}).unwrap();
        for (case, got) in cases.iter().zip(&out) {
            // transformers' ids include the eos that ended a row; ours stop before it.
            let mut want = ids(&case["new_ids"]);
            let ended = want.len() < 8 || want.last() == Some(&0);
            if ended {
                assert_eq!(want.pop(), Some(0), "{name}: a short transformers generation ends in eos");
                assert_eq!(got.finish, FinishReason::Eos);
            }
            assert_eq!(got.completion_ids, want, "{name}: greedy ids for {:?}", case["prompt"]);
        }
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn completion_only_lm_head_matches_transformers() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox"] {
        check_path(name, Path::CompletionOnly);
    }
}

#[test]
fn fast_paths_equal_the_composite_path() {
    // The fused log-softmax kernel and the completion-only LM head against the composite reference,
    // forward (Σ logps) and backward (every parameter's gradient), to 1e-5 relative.
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox"] {
        let (_, want_logps, want_counts, want_grads, _) = run_path(name, Path::Composite);
        for path in [Path::Fused, Path::CompletionOnly] {
            let (_, logps, counts, grads, _) = run_path(name, path);
            assert_eq!(counts, want_counts);
            for (g, w) in logps.iter().zip(&want_logps) {
                assert!(close(*g, *w, 1e-5, 1e-6), "{name} {path:?}: logps {g} vs composite {w}");
            }
            assert_eq!(grads.len(), want_grads.len());
            for (pname, w) in &want_grads {
                let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30);
                let diff = (&grads[pname] - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    diff / scale < 1e-5,
                    "{name} {path:?} {pname}: gradient differs by {:e} of its largest entry",
                    diff / scale
                );
            }
        }
    }
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    // The candle 0.11 trap: fused ops without backward silently leave parameters at zero gradient.
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox", "tiny-gpt-neox-seq"] {
        let (_, _, _, grads, _) = run(name);
        let (policy, _) = Policy::load(&fixtures().join(name), &Device::Cpu).unwrap();
        assert_eq!(grads.len(), policy.params.len());
        for (pname, g) in &grads {
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name}: parameter {pname} received a zero gradient");
        }
    }
}

#[test]
fn tokenizer_ids_match_transformers() {
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let fixture = fixture_json("parity.json")["tokenizer"].clone();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "text {text:?}");
    }
    assert_eq!((tok.eos_token.as_str(), tok.eos_token_id, tok.pad_token_id), ("<|endoftext|>", 0, 0));
}
