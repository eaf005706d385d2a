//! Where a KTO microbatch's time goes, phase by phase, on a real model (the profile in
//! docs/BENCHMARKS.md). Not a test: timings depend on the machine and its load.
//!
//!     cargo run --release -p prospect --example profile_kto_step -- MODEL_DIR [b] [t] [repeats]
//!
//! For a `[b, t]` batch of random token ids (every position a completion token), it times, as the
//! training loop runs them:
//! - a forward pass to the logits without gradient tracking (what the reference and the KL pass cost);
//! - the same with gradient tracking (the policy's pass);
//! - `sequence_logps` on those logits, fused kernel and composite reference;
//! - the backward pass from the summed log-probs (fused path).
//!
//! It reports FLOP/s for the matmuls (2 · params · tokens forward, twice that backward).

use std::time::Instant;

use candle_core::{Device, Tensor};
use prospect::model::{sequence_logps, sequence_logps_composite, Policy};

fn time<T>(label: &str, repeats: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..repeats {
        let started = Instant::now();
        out = Some(f());
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!("{label:<48} {:>8.1} ms (best of {repeats})", best * 1e3);
    (best, out.expect("repeats >= 1"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model_dir = args.get(1).ok_or("usage: profile_kto_step MODEL_DIR [b] [t] [repeats]")?;
    let b: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let t: usize = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let repeats: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    let device = Device::Cpu;
    let (policy, _) = Policy::load(model_dir.as_ref(), &device)?;
    let model = policy.model(&device)?;
    let frozen = policy.frozen_model(&device)?;
    let v = policy.config.vocab_size;
    println!(
        "model {model_dir}: {} parameters, batch [{b}, {t}], vocab {v}, {} threads",
        policy.params.num_elements(),
        candle_core::utils::get_num_threads()
    );

    let ids: Vec<u32> = (0..b * t).map(|i| ((i as u64 * 2654435761) % v as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &device)?;
    let mask = Tensor::ones((b, t), candle_core::DType::F32, &device)?;

    let (fwd_frozen, logits) = time("forward to logits, no grad", repeats, || frozen.forward(&ids).unwrap());
    let (fused, _) = time("sequence_logps, fused kernel", repeats, || sequence_logps(&logits, &ids, &mask).unwrap());
    let (composite, _) = time("sequence_logps, composite (reference)", repeats, || {
        sequence_logps_composite(&logits, &ids, &mask).unwrap()
    });
    drop(logits);
    let (fwd_grad, _) = time("forward to logits, grad tracked", repeats, || model.forward(&ids).unwrap());
    let (backward, _) = time("forward + fused logps + backward", repeats, || {
        let logits = model.forward(&ids).unwrap();
        let logps = sequence_logps(&logits, &ids, &mask).unwrap().logps;
        logps.sum_all().unwrap().backward().unwrap()
    });
    let (backward_composite, _) = time("forward + composite logps + backward", repeats, || {
        let logits = model.forward(&ids).unwrap();
        let logps = sequence_logps_composite(&logits, &ids, &mask).unwrap().logps;
        logps.sum_all().unwrap().backward().unwrap()
    });

    // Matmul FLOPs: every parameter multiplies each token once (2 FLOPs) in the forward pass; the
    // lm_head is tied to the embedding, so count it once, and the embedding lookup is not a matmul.
    // Attention scores and values add 4·t·d per token per layer.
    let c = &policy.config;
    let tokens = (b * t) as f64;
    let params = policy.params.num_elements() as f64;
    let attn = 4.0 * t as f64 * c.hidden_size as f64 * c.num_hidden_layers as f64 / 2.0; // causal: half
    let fwd_flops = tokens * (2.0 * params + attn);
    println!("forward FLOPs {:.1} G: no-grad forward at {:.1} GFLOP/s", fwd_flops / 1e9, fwd_flops / fwd_frozen / 1e9);
    let step = backward - fwd_grad;
    println!(
        "backward alone (fused) {:.1} ms at {:.1} GFLOP/s (2x forward FLOPs); logps fused {:.1} ms vs composite {:.1} ms; \
         forward+backward composite {:.1} ms vs fused {:.1} ms",
        step * 1e3,
        2.0 * fwd_flops / step / 1e9,
        fused * 1e3,
        composite * 1e3,
        backward_composite * 1e3,
        backward * 1e3
    );
    Ok(())
}
