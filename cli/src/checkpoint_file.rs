//! `wasmgrid run --checkpoint FILE`: a job's checkpoints in a file, so that a local run can be
//! stopped and resumed as a market try would be. The layout: `wgck1` (5 bytes), the step (u64
//! little-endian), then the checkpoint's bytes. Each save replaces the file whole (written
//! beside it, then renamed), so a run killed mid-save leaves the one before.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use host::checkpoint::{Checkpoint, CheckpointSink};

const MAGIC: &[u8; 5] = b"wgck1";

/// The checkpoint in `path`, or `None` when there is no such file.
pub(crate) fn read(path: &Path) -> anyhow::Result<Option<Checkpoint>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading the checkpoint {}", path.display())),
    };
    let Some((head, rest)) = bytes.split_at_checked(MAGIC.len()) else {
        bail!("{} is not a wasmgrid checkpoint (too short)", path.display())
    };
    let Some((step, data)) = rest.split_first_chunk::<8>() else {
        bail!("{} is not a wasmgrid checkpoint (too short)", path.display())
    };
    if head != MAGIC {
        bail!("{} is not a wasmgrid checkpoint (it does not start with {:?})", path.display(), "wgck1");
    }
    if data.len() > proto::msg::CHECKPOINT_CAP {
        bail!(
            "{} holds {} bytes, more than a checkpoint may ({})",
            path.display(),
            data.len(),
            proto::msg::CHECKPOINT_CAP
        );
    }
    Ok(Some(Checkpoint { step: u64::from_le_bytes(*step), bytes: data.to_vec() }))
}

fn write(path: &Path, c: &Checkpoint) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + c.bytes.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&c.step.to_le_bytes());
    bytes.extend_from_slice(&c.bytes);
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)
}

#[derive(Default)]
struct Kept {
    newest: Option<u64>,
    error: Option<String>,
}

/// Where a run's saves go: the file, newest step first (a cluster's members may all save).
pub(crate) struct Saves {
    path: Option<PathBuf>,
    kept: Arc<Mutex<Kept>>,
}

impl Saves {
    pub(crate) fn new(path: Option<PathBuf>) -> Saves {
        Saves { path, kept: Arc::default() }
    }

    /// A sink for one member's saves (none without a file: the saves go nowhere).
    pub(crate) fn sink(&self) -> Option<CheckpointSink> {
        let path = self.path.clone()?;
        let kept = self.kept.clone();
        Some(Box::new(move |c: Checkpoint| {
            let mut k = kept.lock().unwrap_or_else(PoisonError::into_inner);
            if k.newest.is_some_and(|s| s > c.step) || k.error.is_some() {
                return;
            }
            match write(&path, &c) {
                Ok(()) => k.newest = Some(c.step),
                Err(e) => k.error = Some(format!("writing the checkpoint {}: {e}", path.display())),
            }
        }))
    }

    /// Whether every save reached the file.
    pub(crate) fn finish(&self) -> anyhow::Result<()> {
        match self.kept.lock().unwrap_or_else(PoisonError::into_inner).error.take() {
            Some(e) => bail!(e),
            None => Ok(()),
        }
    }
}
