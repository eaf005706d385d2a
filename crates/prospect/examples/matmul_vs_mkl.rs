//! The matrix products of a SmolLM2-135M training step, timed on candle's CPU matmul (the `gemm` crate),
//! for the comparison with MKL in docs/BENCHMARKS.md (`scripts/bench/matmul_mkl.py` times the same
//! shapes in PyTorch). Not a test: timings depend on the machine and its load.
//!
//!     cargo run --release -p prospect --example matmul_vs_mkl -- [repeats]
//!
//! Prints, per `[m, k] x [k, n]` shape, the median GFLOP/s (2·m·k·n per product) over `repeats` runs.

use std::time::Instant;

use candle_core::{Device, Tensor};

/// (m, k, n): square references, then a microbatch of 512 tokens through SmolLM2's projections
/// (q/o: 576 → 576, k/v: 576 → 192, gate/up: 576 → 1536, down: 1536 → 576) and 350 completion positions
/// through the LM head (576 → 49152).
pub const SHAPES: [(usize, usize, usize); 7] = [
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (512, 576, 1536),
    (512, 1536, 576),
    (512, 576, 576),
    (512, 576, 192),
    (350, 576, 49152),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repeats: usize = std::env::args().nth(1).map_or(Ok(10), |s| s.parse())?;
    let dev = Device::Cpu;
    println!("candle {} threads", candle_core::utils::get_num_threads());
    for (m, k, n) in SHAPES {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1., (k, n), &dev)?;
        for _ in 0..3 {
            a.matmul(&b)?;
        }
        let mut times: Vec<f64> = (0..repeats)
            .map(|_| {
                let started = Instant::now();
                let _ = a.matmul(&b);
                started.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!("({m}, {k}, {n}) {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / median / 1e9);
    }
    Ok(())
}
