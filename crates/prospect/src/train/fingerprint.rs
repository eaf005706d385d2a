//! What determines a run's trajectory, recorded in every checkpoint so that `--resume` can refuse to
//! continue a different run: every config key that changes the numbers (the loss and its
//! hyperparameters, batch layout, optimizer, schedule, data options, seed) plus digests of the model,
//! reference and data files' contents.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TrainConfig;
use crate::error::{Error, Result};

/// Config keys that do not change a run's numbers: where it writes, how often it saves and evaluates,
/// whether the reference log-probs are cached (the cached values are the live ones), and the device (a
/// run checkpointed on the CPU may resume on a GPU, as it may on another number of ranks).
const NOT_IN_FINGERPRINT: [&str; 5] = ["output_dir", "save_every", "eval_every", "precompute_ref_logps", "device"];

/// Files larger than this are digested by size plus their first and last MiB, so a multi-GB checkpoint
/// costs milliseconds; smaller files (configs, tokenizers, data) are digested whole.
const WHOLE_FILE_LIMIT: u64 = 64 << 20;
const EDGE: u64 = 1 << 20;

/// `key = value` pairs: config keys flattened with dots (`loss.beta`), and `<path key>.sha256` digests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub entries: BTreeMap<String, String>,
}

impl Fingerprint {
    pub fn of(config: &TrainConfig) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(&config.to_toml()?).map_err(|e| Error::config("<serialize>", e.to_string()))?;
        let mut entries = BTreeMap::new();
        flatten("", &toml::Value::Table(table), &mut entries);
        entries.retain(|k, _| !NOT_IN_FINGERPRINT.contains(&k.as_str()));
        let paths = [
            ("model", Some(&config.model)),
            ("reference", config.reference.as_ref()),
            ("train_data", Some(&config.train_data)),
            ("eval_data", config.eval_data.as_ref()),
            ("lora.init_adapter", config.lora.as_ref().and_then(|l| l.init_adapter.as_ref())),
        ];
        for (key, path) in paths {
            if let Some(path) = path {
                entries.insert(format!("{key}.sha256"), digest(path)?);
            }
        }
        Ok(Self { entries })
    }

    /// `key: was → now` for every entry that differs.
    pub fn differences(&self, now: &Fingerprint) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> = self.entries.keys().chain(now.entries.keys()).collect();
        let show = |v: Option<&String>| v.map_or("(unset)".to_string(), |s| s.clone());
        keys.into_iter()
            .filter(|k| self.entries.get(*k) != now.entries.get(*k))
            .map(|k| format!("{k}: {} → {}", show(self.entries.get(k)), show(now.entries.get(k))))
            .collect()
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => _ = out.insert(prefix.to_string(), other.to_string()),
    }
}

/// A digest of a file, or of every file in a folder (by relative name, sorted).
pub(crate) fn digest(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    // A feedback database: the rows it gives (a database file changes with every answer served).
    if crate::feedback::DbUrl::is_db(&path.to_string_lossy()) {
        hasher.update(crate::data::read::read_bytes(path)?);
        return Ok(format!("{:x}", hasher.finalize()));
    }
    let mut files = Vec::new();
    collect_files(path, path, &mut files)?;
    files.sort();
    for (name, file) in files {
        hasher.update(name.as_bytes());
        digest_file(&file, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn collect_files(root: &Path, path: &Path, out: &mut Vec<(String, std::path::PathBuf)>) -> Result<()> {
    if path.is_file() {
        let name = path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned();
        out.push((name, path.to_path_buf()));
        return Ok(());
    }
    let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(path, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            collect_files(root, &entry.path(), out)?;
        }
    }
    Ok(())
}

fn digest_file(path: &Path, hasher: &mut Sha256) -> Result<()> {
    let io = |e| Error::io(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    hasher.update(len.to_le_bytes());
    if len <= WHOLE_FILE_LIMIT {
        std::io::copy(&mut f, hasher).map_err(io)?;
        return Ok(());
    }
    let mut edge = vec![0u8; EDGE as usize];
    f.read_exact(&mut edge).map_err(io)?;
    hasher.update(&edge);
    f.seek(SeekFrom::End(-(EDGE as i64))).map_err(io)?;
    f.read_exact(&mut edge).map_err(io)?;
    hasher.update(&edge);
    Ok(())
}
