//! Key files: the log sealer's signing key.

use anyhow::{Context, bail};
use cairn_log::seal::SealSigner;
use std::io::Write;
use std::path::Path;

/// Loads the seal signing key from `path` (64 hex digits), creating it, readable by its owner only,
/// if it does not exist. The public key is written beside it (`<path>.pub`) for verifiers.
pub fn load_or_create_seal_key(path: &Path) -> anyhow::Result<SealSigner> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut secret = [0u8; 32];
            if hex::decode_to_slice(text.trim(), &mut secret).is_err() {
                bail!("seal key {}: not 64 hex digits", path.display());
            }
            Ok(SealSigner::from_secret(&secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = SealSigner::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("seal key directory {}", dir.display()))?;
            }
            let mut file = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("creating seal key {}", path.display()))?
            };
            writeln!(file, "{}", hex::encode(signer.secret()))?;
            file.sync_all()?;
            let public = path.with_extension("key.pub");
            std::fs::write(&public, format!("{}\n", signer.public_key_hex()))
                .with_context(|| format!("writing {}", public.display()))?;
            tracing::info!(key = %path.display(), public_key = %signer.public_key_hex(), "created a seal signing key");
            Ok(signer)
        }
        Err(e) => Err(e).with_context(|| format!("reading seal key {}", path.display())),
    }
}

/// A public key given on the command line: 64 hex digits, or a file holding them.
pub fn read_public_key(arg: &str) -> anyhow::Result<ed25519_dalek::VerifyingKey> {
    let text = if Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))?
    } else {
        arg.to_owned()
    };
    cairn_log::seal::parse_public_key(&text).map_err(|e| anyhow::anyhow!("--seal-public-key {arg}: {e}"))
}
