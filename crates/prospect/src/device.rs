//! Where a run computes: `cpu`, or `cuda:N` (the N-th GPU; `cuda` means `cuda:0`) in a build with the
//! `cuda` feature (docs/CUDA.md).

use candle_core::Device;

use crate::error::{Error, Result};

/// The GPU ordinal a spec names: `None` for `cpu`, `Some(n)` for `cuda:n`; any other text is an error
/// message saying what is accepted.
pub fn parse_spec(spec: &str) -> std::result::Result<Option<usize>, String> {
    match spec.trim() {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => Err(format!("`{spec}` is not a device: expected `cpu`, `cuda` or `cuda:N` (N = 0, 1, ...)")),
        },
    }
}

/// Open the device a spec names. `origin` says where the spec was written (for the error).
pub fn open(spec: &str, origin: &str) -> Result<Device> {
    let config_error = |message: String| Error::Config { origin: origin.into(), key: "device".into(), message };
    match parse_spec(spec).map_err(config_error)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => open_cuda(ordinal).map_err(config_error),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> std::result::Result<Device, String> {
    Device::new_cuda(ordinal).map_err(|e| {
        format!(
            "cannot open GPU {ordinal}: {e}. The CUDA driver (libcuda.so.1) and CUDA 13 libraries (libcublas, \
             libcublasLt, libcurand, libnvrtc) must be on the library path"
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> std::result::Result<Device, String> {
    Err(format!(
        "`cuda:{ordinal}` needs a build with CUDA: `cargo build --release -p prospect-cli --features cuda` \
         (scripts/setup_cuda.sh installs what the build needs; docs/CUDA.md)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(parse_spec("cpu"), Ok(None));
        assert_eq!(parse_spec("cuda"), Ok(Some(0)));
        assert_eq!(parse_spec("cuda:3"), Ok(Some(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA:0", "cuda:-1"] {
            let e = parse_spec(bad).unwrap_err();
            assert!(e.contains("expected `cpu`, `cuda` or `cuda:N`"), "{bad}: {e}");
        }
        assert!(open("cpu", "test").unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_in_a_cpu_build_is_a_config_error_naming_the_feature() {
        let e = open("cuda:0", "run.toml:3").unwrap_err().to_string();
        assert!(e.starts_with("run.toml:3: `device`:"), "{e}");
        assert!(e.contains("--features cuda"), "{e}");
    }
}
