//! The CUDA kernels (`model/kernels_cuda.rs`) against the CPU kernels, forward and backward, on random
//! shapes: the same op through the same public function, once per device, to 1e-5 of the largest entry.
//! Built only with the `cuda` feature and run on the GPU machine (scripts/gpu_check.sh runs
//! `cargo test`-built binaries there too); it fails, never skips, when no GPU can be opened.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use prospect::model::{kernels, ops};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA GPU (this test runs on the GPU machine)")
}

/// Values in [-scale, scale) from a fixed LCG: the same on every machine.
fn uniform(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a − b| / max(max |b|, 1e-30), with `a` brought to the CPU.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30);
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
}

/// Run `f` on `inputs` (as Vars) on the CPU and on the GPU; compare outputs and the gradients of
/// Σ (output · w) for a fixed random `w`.
fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let run = |device: &Device| -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let w = uniform(y.dims(), 99, 1.0).to_device(device).unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (y, vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect())
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu);
    let (y_gpu, g_gpu) = run(&gpu());
    let d = rel_diff(&y_gpu, &y_cpu);
    assert!(d < 1e-5, "{name}: forward differs by {d:e}");
    for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        let d = rel_diff(a, b);
        assert!(d < 1e-5, "{name}: gradient of input {i} differs by {d:e}");
    }
}

#[test]
fn every_cuda_kernel_matches_the_cpu_kernel_forward_and_backward() {
    for (n, d) in [(7, 64), (33, 576), (5, 1000)] {
        check("rms_norm", &[uniform(&[n, d], 1, 2.0), uniform(&[d], 2, 1.0)], |t| {
            kernels::rms_norm(&t[0], &t[1], 1e-5).unwrap()
        });
        check("swiglu", &[uniform(&[n, d], 3, 4.0), uniform(&[n, d], 4, 1.0)], |t| {
            kernels::swiglu(&t[0], &t[1]).unwrap()
        });
    }
    for (n, v) in [(9, 50), (17, 49152)] {
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let targets = Tensor::new(targets, &Device::Cpu).unwrap();
        check("token_logps", &[uniform(&[n, v], 5, 8.0)], |t| {
            kernels::token_logps(&t[0], &targets.to_device(t[0].device()).unwrap()).unwrap()
        });
    }
    for (b, h, r, t) in [(2, 3, 1, 5), (1, 2, 3, 130), (2, 1, 2, 300)] {
        // r stacked blocks of t queries (grouped-query attention's layout).
        check("causal_softmax", &[uniform(&[b, h, r * t, t], 6, 3.0)], |x| {
            kernels::causal_softmax(&x[0], 0.125).unwrap()
        });
    }
    for (b, h, t, e) in [(2, 3, 5, 8), (1, 9, 33, 64)] {
        let (cos, sin) = ops::rope_tables(t, e, 10_000.0, &Device::Cpu).unwrap();
        check("rope (strided input)", &[uniform(&[b, t, h, e], 7, 1.0)], |x| {
            let (c, s) = (cos.to_device(x[0].device()).unwrap(), sin.to_device(x[0].device()).unwrap());
            kernels::apply_rope(&x[0].transpose(1, 2).unwrap(), &c, &s).unwrap()
        });
    }
}

#[test]
fn the_gpu_composite_paths_match_the_cpu_fused_ones() {
    // The frozen product and the frozen SwiGLU-down product have no CUDA kernel: composite on the GPU.
    let w = uniform(&[24, 40], 8, 0.5);
    check("swiglu_down_frozen", &[uniform(&[3, 5, 40], 9, 2.0), uniform(&[3, 5, 40], 10, 1.0)], |t| {
        kernels::swiglu_down_frozen(&t[0], &t[1], &w.to_device(t[0].device()).unwrap()).unwrap()
    });
    check("frozen_matmul", &[uniform(&[6, 40], 11, 1.0)], |t| {
        prospect::model::lora::frozen_matmul(&t[0], &w.to_device(t[0].device()).unwrap()).unwrap()
    });
}
