//! Resumable checkpoints: the policy weights, the optimizer moments and the step count, in one folder
//! that is replaced atomically. Data order is a pure function of (`seed`, epoch), so a resumed run
//! replays exactly the batches an uninterrupted one would have seen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use serde::{Deserialize, Serialize};

use super::fingerprint::Fingerprint;
use super::optim::{AdamW, AdamWConfig};
use crate::error::{Error, Result};
use crate::model::{load_tensors, Params, TRAIN_DTYPE};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The loss's own state across steps (empty for stateless losses; see `loss::Loss::observe`).
    #[serde(default)]
    pub loss_state: crate::loss::LossState,
    /// What determined the run that wrote this checkpoint; `None` in checkpoints older than the field.
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
}

/// Fail when any tensor holds a NaN or an infinity: nothing non-finite is saved or resumed from.
pub fn ensure_finite(tensors: &BTreeMap<String, Tensor>, what: &Path) -> Result<()> {
    for (name, t) in tensors {
        let max = t.abs()?.max_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !max.is_finite() {
            return Err(Error::Numerics(format!("{}: `{name}` holds non-finite values", what.display())));
        }
    }
    Ok(())
}

pub fn checkpoint_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoint")
}

/// Write `output_dir/checkpoint/` (weights, optimizer, state, resolved config).
pub fn save(
    output_dir: &Path,
    params: &Params,
    opt: &AdamW,
    state: &TrainerState,
    config_toml: &str,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output_dir);
    let tensors = params.detached_tensors();
    ensure_finite(&tensors, &dir)?;
    crate::fsio::replace_dir_atomic(&dir, |tmp| {
        crate::model::save_tensors(&tensors, &tmp.join("model.safetensors"))?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        crate::fsio::write_json_atomic(&tmp.join("trainer_state.json"), state)?;
        crate::fsio::write_atomic(&tmp.join("prospect.toml"), config_toml.as_bytes())
    })?;
    Ok(dir)
}

/// Load `output_dir/checkpoint/` into `params` (in place) and return the optimizer and state. First
/// completes a swap that a kill interrupted. Refuses (unless `force`) a checkpoint whose fingerprint
/// differs from `fingerprint`, and always refuses a missing or incomplete one and non-finite weights.
/// The `Vec` says what recovery did.
pub fn load(
    output_dir: &Path,
    params: &Params,
    opt_config: AdamWConfig,
    device: &candle_core::Device,
    fingerprint: &Fingerprint,
    force: bool,
) -> Result<(AdamW, TrainerState, Vec<String>)> {
    let dir = checkpoint_dir(output_dir);
    let recovered = crate::fsio::recover(&dir)?;
    let refuse = |message: String| Error::Resume { path: dir.clone(), message };
    if !dir.exists() {
        return Err(refuse("there is no checkpoint (run without --resume to start afresh)".into()));
    }
    let state_path = dir.join("trainer_state.json");
    if !state_path.exists() {
        return Err(refuse("the checkpoint is incomplete: it has no trainer_state.json".into()));
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::model(&state_path, format!("invalid trainer state: {e}")))?;
    check_fingerprint(&state, fingerprint, force).map_err(refuse)?;
    let tensors = load_tensors(&dir, TRAIN_DTYPE, device)?;
    ensure_finite(&tensors, &dir)?;
    for (name, var) in params.iter() {
        let t = tensors.get(name).ok_or_else(|| Error::model(&dir, format!("checkpoint lacks parameter `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::Shape { name: name.clone(), expected: var.dims().to_vec(), got: t.dims().to_vec() });
        }
        var.set(t)?;
    }
    let opt = AdamW::load(opt_config, &dir.join("optimizer.safetensors"), state.step, device)?;
    Ok((opt, state, recovered))
}

fn check_fingerprint(state: &TrainerState, now: &Fingerprint, force: bool) -> std::result::Result<(), String> {
    let differences = match &state.fingerprint {
        Some(then) => then.differences(now),
        None => vec!["the checkpoint has no fingerprint (it predates them)".to_string()],
    };
    if differences.is_empty() || force {
        return Ok(());
    }
    Err(format!("it was written by a different run (--resume-force continues anyway):\n  {}", differences.join("\n  ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossState;
    use candle_core::{Device, Tensor};

    #[test]
    fn a_loss_state_survives_a_checkpoint() {
        // A stateful loss (BCO's running mean: count, mean, M2) gets back exactly what it saved.
        let dir = std::env::temp_dir().join(format!("prospect-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let w = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let params = Params::from_tensors(&BTreeMap::from([("w.weight".to_string(), w)])).unwrap();
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let fingerprint = Fingerprint::default();
        let loss_state = LossState { values: vec![12.0, -0.375, 2.5] };
        let state = TrainerState { step: 7, loss_state, fingerprint: Some(fingerprint.clone()) };
        save(&dir, &params, &AdamW::new(config), &state, "").unwrap();
        let (_, back, _) = load(&dir, &params, config, &Device::Cpu, &fingerprint, false).unwrap();
        assert_eq!((back.step, back.loss_state), (7, state.loss_state));
        // A checkpoint from before the state existed reads as an empty state.
        let old: TrainerState = serde_json::from_str(r#"{"step": 3}"#).unwrap();
        assert_eq!(old.loss_state, LossState::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
