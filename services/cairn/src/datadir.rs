//! The data directory: one folder holding the event log (`log/`) and, later, everything derived
//! from it. A marker file tells our directories from anything else, so a mistyped path never gets
//! written into; the log inside holds the lock that keeps a second process out.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};

const MARKER: &str = "CAIRN_DATA_DIR";
/// Format 2: the log's hash chain links record digests (chain v2, `cairn_log::chain`). A format 1
/// directory's chain is v1, which this build would report as tampered, so it is refused by name.
const MARKER_TEXT: &str = "cairn data directory, format 2\n";
const FORMAT_1: &str = "cairn data directory, format 1\n";

pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens the data directory, creating it if it does not exist or is empty.
    pub fn open_or_create(root: &Path) -> anyhow::Result<DataDir> {
        let marker = root.join(MARKER);
        if root.exists() {
            if !root.is_dir() {
                bail!("data directory {}: not a directory", root.display());
            }
            if !marker.exists() {
                let mut entries = std::fs::read_dir(root)
                    .with_context(|| format!("data directory {}: cannot read", root.display()))?;
                if entries.next().is_some() {
                    bail!(
                        "data directory {}: not empty and not a Cairn data directory (no {MARKER} file); refusing to touch it",
                        root.display()
                    );
                }
            }
        } else {
            std::fs::create_dir_all(root)
                .with_context(|| format!("data directory {}: cannot create", root.display()))?;
        }
        if !marker.exists() {
            std::fs::write(&marker, MARKER_TEXT)
                .with_context(|| format!("data directory {}: cannot write", root.display()))?;
        }
        Self::check_marker(root)?;
        Ok(DataDir { root: root.to_owned() })
    }

    /// Opens an existing data directory for reading; never creates anything.
    pub fn open_existing(root: &Path) -> anyhow::Result<DataDir> {
        if !root.is_dir() {
            bail!("data directory {}: does not exist", root.display());
        }
        Self::check_marker(root)?;
        Ok(DataDir { root: root.to_owned() })
    }

    fn check_marker(root: &Path) -> anyhow::Result<()> {
        let marker = root.join(MARKER);
        match std::fs::read_to_string(&marker) {
            Ok(text) if text == MARKER_TEXT => Ok(()),
            Ok(text) if text == FORMAT_1 => bail!(
                "data directory {}: written by an earlier Cairn (format 1, hash chain v1); this build reads format 2 \
                 and cannot verify that log: read it with the build that wrote it",
                root.display()
            ),
            Ok(text) => bail!(
                "data directory {}: unsupported format {:?} (this build reads {:?})",
                root.display(),
                text.trim(),
                MARKER_TEXT.trim()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("data directory {}: not a Cairn data directory (no {MARKER} file)", root.display())
            }
            Err(e) => Err(e).with_context(|| format!("data directory {}: cannot read {MARKER}", root.display())),
        }
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }

    /// Projections: derived from the log, safe to delete (they are rebuilt at the next start).
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }
}
