//! Does a LoRA run gain from keeping its frozen base in bf16 or f16 on the CPU? (docs/BENCHMARKS.md)
//!
//!     cargo run --release -p prospect --example frozen_base_dtype -- [tokens] [repeats]
//!
//! For the linear layers of SmolLM2-135M (d 576, f 1536) and of SmolLM2-1.7B (d 2048, f 8192), it times
//! the forward product `x Wᵀ` of `tokens` rows four ways and prints the median of `repeats`:
//! - `f32`: the weight kept in f32 (what training does today);
//! - `bf16→f32`, `f16→f32`: the weight kept in 16 bits and cast to f32 for the product, as a per-layer cast
//!   in the forward pass would do (the cast is included);
//! - `bf16`, `f16`: the product computed in 16 bits (input cast too), for comparison.
//!
//! Memory is not measured here: a 16-bit base is half the bytes of an f32 one, whatever the speed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(repeats: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    f(); // warm up
    median(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                let y = f();
                let _ = y.dims();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tokens: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let repeats: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let dev = Device::Cpu;
    println!("tokens {tokens}, median of {repeats}; ms per product (GFLOP/s)");
    for (name, d, f) in [("SmolLM2-135M up_proj", 576usize, 1536usize), ("SmolLM2-1.7B up_proj", 2048, 8192)] {
        let x = Tensor::randn(0f32, 1.0, (tokens, d), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (f, d), &dev)?;
        let flops = 2.0 * (tokens * d * f) as f64;
        let mut line = format!("{name} [{tokens}, {d}] x [{d}, {f}]:");
        let mut report =
            |label: &str, s: f64| line.push_str(&format!("  {label} {:.1} ms ({:.0})", s * 1e3, flops / s / 1e9));
        report("f32", time(repeats, || x.matmul(&w.t().unwrap()).unwrap()));
        for dt in [DType::BF16, DType::F16] {
            let w16 = w.to_dtype(dt)?;
            let label = format!("{dt:?}→f32").to_lowercase();
            report(&label, time(repeats, || x.matmul(&w16.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap()));
            let x16 = x.to_dtype(dt)?;
            report(&format!("{dt:?}").to_lowercase(), time(repeats, || x16.matmul(&w16.t().unwrap()).unwrap()));
        }
        println!("{line}");
    }
    Ok(())
}
