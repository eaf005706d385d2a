//! Incremental decoding: the KV-cache path must give the full forward's logits at every position, for
//! batched, left-padded rows; greedy generation must equal argmax over repeated full forwards.

mod common;

use candle_core::{Device, Tensor};
use common::fixtures;
use prospect::eval::{generate, sampling::argmax, FinishReason, GenerateConfig, SamplingConfig};
use prospect::model::{CausalLm, HfTokenizer, Policy};

fn model(name: &str) -> CausalLm {
    let (policy, _) = Policy::load(&fixtures().join(name), &Device::Cpu).unwrap();
    policy.frozen_model(&Device::Cpu).unwrap()
}

fn full_logits(m: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    m.forward(&t).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cached_logits_equal_full_forward_at_every_position() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let m = model(name);
        let rows: [Vec<u32>; 2] = [vec![330, 28, 355, 319, 298, 263, 264, 325, 33, 201], vec![54, 307, 343, 336]];
        let prompt_len = [6usize, 2];
        // Batch both rows, left-padded to the longer prompt, then feed the rest one token per step.
        let width = 6;
        let mut mask: Vec<Vec<u8>> = vec![];
        let mut ids = vec![];
        for (r, &n) in rows.iter().zip(&prompt_len) {
            ids.extend(std::iter::repeat_n(0, width - n).chain(r[..n].iter().copied()));
            mask.push(std::iter::repeat_n(0, width - n).chain(std::iter::repeat_n(1, n)).collect());
        }
        let mut cache = m.new_cache();
        let first: Vec<Vec<Vec<f32>>> = m
            .forward_cached(&Tensor::from_vec(ids, (2, width), &Device::Cpu).unwrap(), &mask, &mut cache)
            .unwrap()
            .to_vec3()
            .unwrap();
        let full: Vec<Vec<Vec<f32>>> = rows.iter().map(|r| full_logits(&m, r)).collect();
        let mut worst = 0f32;
        for (i, &n) in prompt_len.iter().enumerate() {
            for p in 0..n {
                worst = worst.max(max_diff(&first[i][width - n + p], &full[i][p]));
            }
        }
        // Then one token at a time; row 1 runs out after 2 more tokens and is fed padding.
        for step in 0..4 {
            let mut next = vec![];
            for (i, r) in rows.iter().enumerate() {
                let pos = prompt_len[i] + step;
                let real = pos < r.len();
                next.push(if real { r[pos] } else { 0 });
                mask[i].push(u8::from(real));
            }
            let out: Vec<Vec<Vec<f32>>> = m
                .forward_cached(&Tensor::from_vec(next, (2, 1), &Device::Cpu).unwrap(), &mask, &mut cache)
                .unwrap()
                .to_vec3()
                .unwrap();
            for (i, r) in rows.iter().enumerate() {
                let pos = prompt_len[i] + step;
                if pos < r.len() {
                    worst = worst.max(max_diff(&out[i][0], &full[i][pos]));
                }
            }
        }
        assert!(worst < 1e-4, "{name}: cached vs full forward logits differ by {worst:e}");
    }
}

#[test]
fn greedy_generation_equals_repeated_argmax() {
    let m = model("tiny-llama");
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let prompts = vec![vec![330u32, 28, 355, 319], vec![54, 307]];
    let cfg = GenerateConfig { max_new_tokens: 8, batch_size: 2, ..Default::default() };
    let gens = generate(&m, &tok, &prompts, &cfg, &Device::Cpu, &mut |_| {}).unwrap();
    for (p, g) in prompts.iter().zip(&gens) {
        // Reference: no cache, the whole sequence through the training forward each step.
        let mut seq = p.clone();
        let mut want = vec![];
        for _ in 0..8 {
            let next = argmax(full_logits(&m, &seq).last().unwrap());
            if next == tok.eos_token_id {
                break;
            }
            want.push(next);
            seq.push(next);
        }
        assert_eq!(g.completion_ids, want);
        assert_eq!(g.finish, if want.len() < 8 { FinishReason::Eos } else { FinishReason::Length });
        assert_eq!(g.completion, tok.decode(&want, true).unwrap());
    }
}

#[test]
fn sampling_is_reproducible_by_seed_and_stop_strings_cut() {
    let m = model("tiny-llama");
    let tok = HfTokenizer::load(&fixtures().join("tiny-llama")).unwrap();
    let prompts = vec![vec![330u32, 28, 355]; 3];
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        sampling: SamplingConfig { temperature: 1.0, top_k: 50, top_p: 0.9 },
        seed: 11,
        ..Default::default()
    };
    let a = generate(&m, &tok, &prompts, &cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let b = generate(&m, &tok, &prompts, &cfg, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(a, b);
    assert!(a.iter().any(|g| g.completion_ids != a[0].completion_ids), "three samples should not all agree");
    // A stop string taken from a sample's own text cuts it there.
    let text = &a[0].completion;
    if let Some(stop) = text.split_whitespace().nth(1) {
        let cut = GenerateConfig { stop: vec![stop.to_string()], ..cfg.clone() };
        let c = generate(&m, &tok, &prompts, &cut, &Device::Cpu, &mut |_| {}).unwrap();
        assert_eq!(c[0].finish, FinishReason::Stop);
        assert!(
            !c[0].completion.contains(stop) && text.starts_with(c[0].completion.as_str()),
            "{:?} vs {text:?}",
            c[0].completion
        );
    }
}
