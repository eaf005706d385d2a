//! Greedy decoding with the KV cache on a real model equals `transformers`' `generate(do_sample=False)`
//! token for token: SmolLM2-135M-Instruct, three ChatML prompts, 30 new tokens, one prompt at a time and
//! as one left-padded batch. Fixture: tests/fixtures/smollm2_greedy.json (scripts/make_smollm2_greedy.py).
//! Needs the SmolLM2 cache from `scripts/fetch_smollm2.sh`, so it builds only with
//! `--features live-reference` (`scripts/test.sh`); with the feature on and no cache it fails, never skips.
#![cfg(feature = "live-reference")]

use std::path::{Path, PathBuf};

use candle_core::Device;
use prospect::eval::{generate, FinishReason, GenerateConfig};
use prospect::model::{HfTokenizer, Policy};

fn model_dir() -> PathBuf {
    let cache = std::env::var_os("PROSPECT_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/smollm2"));
    assert!(
        cache.join("READY").exists(),
        "the SmolLM2 cache is missing at {}: run `scripts/fetch_smollm2.sh` or `bash scripts/test.sh`",
        cache.display()
    );
    cache.join("reference-f32")
}

#[test]
fn greedy_generation_equals_transformers_on_smollm2() {
    let dir = model_dir();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2_greedy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dev = Device::Cpu;
    let tok = HfTokenizer::load(&dir).unwrap();
    let eos = fixture["eos_token_id"].as_u64().unwrap() as u32;
    assert_eq!(tok.eos_token_id, eos);
    let model = Policy::load(&dir, &dev).unwrap().0.frozen_model(&dev).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let p = tok.encode(c["prompt"].as_str().unwrap()).unwrap();
            assert_eq!(p, ids(&c["prompt_ids"]), "prompt tokenization differs");
            p
        })
        .collect();
    // transformers includes the eos it stopped on; Prospect reports it as the finish reason.
    let ours = |g: &prospect::eval::Generation| -> Vec<u32> {
        let mut v = g.completion_ids.clone();
        if g.finish == FinishReason::Eos {
            v.push(eos);
        }
        v
    };
    for batch_size in [1, 3] {
        let cfg = GenerateConfig { max_new_tokens: 30, batch_size, ..Default::default() };
        let gens = generate(&model, &tok, &prompts, &cfg, &dev, &mut |_| {}).unwrap();
        for (i, (g, c)) in gens.iter().zip(cases).enumerate() {
            let want: Vec<u32> = if batch_size == 1 {
                ids(&c["new_ids"])
            } else {
                // In the batch, transformers pads a finished row after its eos.
                let row = ids(&fixture["batched_new_ids"][i]);
                match row.iter().position(|&t| t == eos) {
                    Some(p) => row[..=p].to_vec(),
                    None => row,
                }
            };
            assert_eq!(ours(g), want, "prompt {i}, batch size {batch_size}: {:?}", g.completion);
        }
    }
}
