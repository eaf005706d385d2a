//! KTO's KL rows (x_i, y_{i−1}) scored against the keys and values of the prompts the main rows
//! (x_i, y_i) already computed (`train::plan::logps_with_kl`) give the log-probs of scoring both batches
//! on their own, to 1e-6 relative, for every model family; the main rows' log-probs and gradients are
//! unchanged bit for bit (their pass is the same pass). DPO's rejected rows after the chosen rows'
//! prompts (`train::plan::paired_logps`) give the same log-probs, and the same gradients, to 1e-6 and
//! 1e-5 relative.

mod common;

use candle_core::{Device, Tensor};
use common::fixtures;
use prospect::data::{collate_sequences, rotate_for_kl, Sequence, SequenceBatch};
use prospect::model::Policy;
use prospect::train::plan::{logps, logps_with_kl, paired_logps};

/// Token ids in [1, v) from a tiny LCG (0 is left out so that no row starts with the pad id used below).
fn tokens(n: usize, seed: u64, v: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            1 + ((s >> 33) % (v as u64 - 1)) as u32
        })
        .collect()
}

/// Prompt and completion lengths of the rows: unequal prompts, a one-token prompt, a completion cut by
/// `MAX_LENGTH`, and two rows whose prompts begin alike (a shared prefix that is not the whole prompt).
const ROWS: [(usize, usize); 5] = [(9, 6), (1, 4), (14, 30), (5, 11), (7, 3)];
const MAX_LENGTH: usize = 24;

/// The main rows and the KL rows (prompt i with completion i − 1), as sequences.
fn sequences(v: usize) -> (Vec<Sequence>, Vec<Sequence>) {
    let mut seqs: Vec<Sequence> = ROWS
        .iter()
        .enumerate()
        .map(|(i, &(p, c))| Sequence {
            prompt_ids: tokens(p, 10 + i as u64, v),
            completion_ids: tokens(c, 20 + i as u64, v),
        })
        .collect();
    let start = seqs[0].prompt_ids[..4].to_vec();
    seqs[4].prompt_ids[..4].copy_from_slice(&start);
    let kl: Vec<Sequence> = rotate_for_kl(seqs.len())
        .into_iter()
        .enumerate()
        .map(|(i, j)| Sequence {
            prompt_ids: seqs[i].prompt_ids.clone(),
            completion_ids: seqs[j].completion_ids.clone(),
        })
        .collect();
    (seqs, kl)
}

fn collate(s: &[&Sequence]) -> SequenceBatch {
    collate_sequences(s, MAX_LENGTH, 0, &Device::Cpu).unwrap()
}

fn batches(v: usize) -> (SequenceBatch, SequenceBatch) {
    let (main, kl) = sequences(v);
    (collate(&main.iter().collect::<Vec<_>>()), collate(&kl.iter().collect::<Vec<_>>()))
}

/// Largest |a − b| over the largest |b|.
fn relative(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
}

#[test]
fn rejected_rows_after_the_chosen_rows_prompts_equal_scoring_them_whole() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox", "tiny-gpt-neox-seq"] {
        let dev = Device::Cpu;
        let (policy, _) = Policy::load(&fixtures().join(name), &dev).unwrap();
        let model = policy.model(&dev).unwrap();
        // Chosen rows, then rejected rows: the same prompts with the other rows' completions.
        let (chosen, rejected) = sequences(policy.config.vocab_size);
        let batch = collate(&chosen.iter().chain(&rejected).collect::<Vec<_>>()); // [10, t]

        let shared = paired_logps(&model, &batch).unwrap(); // [10]
        let whole = logps(&model, &batch).unwrap(); // [10]
        let rel = relative(&values(&shared), &values(&whole));
        assert!(rel <= 1e-6, "{name}: log-probs differ by {rel:e} relative");
        // A weighted sum, so that chosen and rejected rows send distinct gradients.
        let w = Tensor::new(&[1f32, -2., 0.5, 3., -1., 2., 1., -0.5, -3., 1.5], &dev).unwrap();
        let g_shared = (&shared * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_whole = (&whole * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (param, var) in policy.params.iter() {
            let flat = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
                g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            let rel = relative(&flat(&g_shared), &flat(&g_whole));
            assert!(rel <= 1e-5, "{name}: gradient of {param} differs by {rel:e} relative");
        }
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec1().unwrap()
}

#[test]
fn kl_rows_after_shared_prompts_equal_scoring_them_whole() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox", "tiny-gpt-neox-seq"] {
        let dev = Device::Cpu;
        let (policy, _) = Policy::load(&fixtures().join(name), &dev).unwrap();
        let (model, frozen) = (policy.model(&dev).unwrap(), policy.frozen_model(&dev).unwrap());
        let (main, kl) = batches(policy.config.vocab_size);

        let (shared_main, shared_kl) = logps_with_kl(&model, &frozen, &main, &kl).unwrap(); // [5] each
        let (whole_main, whole_kl) = (logps(&model, &main).unwrap(), logps(&frozen, &kl).unwrap());

        assert_eq!(values(&shared_main), values(&whole_main), "{name}: main rows");
        for (i, (s, w)) in values(&shared_kl).iter().zip(values(&whole_kl)).enumerate() {
            let rel = (s - w).abs() / w.abs();
            assert!(rel <= 1e-6, "{name}: KL row {i}: shared {s} vs whole {w} (relative {rel:e})");
            assert!(w.abs() > 1.0, "{name}: KL row {i} scores real tokens ({w})");
        }
        let g_shared = shared_main.sum_all().unwrap().backward().unwrap();
        let g_whole = whole_main.sum_all().unwrap().backward().unwrap();
        for (param, var) in policy.params.iter() {
            let (a, b) = (g_shared.get(var.as_tensor()).unwrap(), g_whole.get(var.as_tensor()).unwrap());
            let (a, b): (Vec<f32>, Vec<f32>) =
                (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
            assert_eq!(a, b, "{name}: gradient of {param}");
        }
        assert!(!shared_kl.track_op(), "{name}: the KL log-probs carry no gradient");
    }
}

#[test]
fn a_one_row_microbatch_scores_its_own_row_as_the_kl_row() {
    let dev = Device::Cpu;
    let (policy, _) = Policy::load(&fixtures().join("tiny-llama"), &dev).unwrap();
    let (model, frozen) = (policy.model(&dev).unwrap(), policy.frozen_model(&dev).unwrap());
    let seq = Sequence { prompt_ids: tokens(6, 1, policy.config.vocab_size), completion_ids: tokens(5, 2, 50) };
    let batch = collate_sequences(&[&seq], MAX_LENGTH, 0, &dev).unwrap();
    let (main, kl) = logps_with_kl(&model, &frozen, &batch, &batch).unwrap();
    // rotate_for_kl(1) = [0]: the KL pair is the row itself, so both values are the row's, bit for bit.
    assert_eq!(values(&main), values(&kl));
    assert_eq!(values(&kl), values(&logps(&frozen, &batch).unwrap()));
}
