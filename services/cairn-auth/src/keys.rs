//! Token-signing keys: created on first start, kept as PKCS#8 PEM files readable by the owner only,
//! identified by their RFC 7638 thumbprint.
//!
//! Access tokens are signed with ES256 (fast to sign: a backend grant costs one signature; fast enough
//! to verify, and verified tokens are cached). ID tokens are signed with RS256, which OpenID Connect
//! requires every relying party to support.

use crate::AuthError;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cairn_events::KeyPurpose;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A private signing key and its public half.
pub struct SigningKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub purpose: KeyPurpose,
    /// The public key as a JWK with `kid`, `alg` and `use`.
    pub public_jwk: Value,
    pub(crate) encoding: EncodingKey,
    /// Creation time (milliseconds since the epoch), from the file name: the newest key of a purpose signs.
    pub created_ms: i64,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::ES256 => "ES256",
        Algorithm::RS256 => "RS256",
        _ => "unsupported",
    }
}

impl SigningKey {
    fn generate(purpose: KeyPurpose) -> Result<Vec<u8>, AuthError> {
        let failed = |_| AuthError::Internal("key generation failed".into());
        Ok(match purpose {
            KeyPurpose::AccessToken => {
                let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(failed)?;
                pair.to_pkcs8v1().map_err(failed)?.as_ref().to_vec()
            }
            KeyPurpose::IdToken => {
                let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(failed)?;
                pair.as_der().map_err(failed)?.as_ref().to_vec()
            }
            KeyPurpose::LogSeal => return Err(not_a_token_key()),
        })
    }

    /// Builds the key from its PKCS#8 DER.
    fn from_pkcs8(purpose: KeyPurpose, der: &[u8], created_ms: i64) -> Result<SigningKey, AuthError> {
        let rejected = |e: aws_lc_rs::error::KeyRejected| AuthError::Internal(format!("signing key rejected: {e}"));
        let pem = pem_encode("PRIVATE KEY", der);
        let (algorithm, mut jwk, encoding) = match purpose {
            KeyPurpose::AccessToken => {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(rejected)?;
                let point = pair.public_key().as_ref(); // 0x04 || x || y
                let jwk = json!({
                    "kty": "EC", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                });
                let enc = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| AuthError::Internal(e.to_string()))?;
                (Algorithm::ES256, jwk, enc)
            }
            KeyPurpose::IdToken => {
                let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(der).map_err(rejected)?;
                let public = pair.public_key();
                let jwk = json!({
                    "kty": "RSA",
                    "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                    "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
                });
                let enc = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| AuthError::Internal(e.to_string()))?;
                (Algorithm::RS256, jwk, enc)
            }
            KeyPurpose::LogSeal => return Err(not_a_token_key()),
        };
        let kid = thumbprint(&jwk);
        jwk["kid"] = kid.clone().into();
        jwk["alg"] = alg_name(algorithm).into();
        jwk["use"] = "sig".into();
        Ok(SigningKey { kid, algorithm, purpose, public_jwk: jwk, encoding, created_ms })
    }
}

impl SigningKey {
    /// Signs arbitrary JSON claims with this key (`kid` in the header).
    pub fn sign_json(&self, claims: &Value) -> Result<String, AuthError> {
        let mut header = jsonwebtoken::Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Internal(format!("signing failed: {e}")))
    }
}

/// A key Cairn signs its own client assertions with at an upstream provider (`private_key_jwt`):
/// a PKCS#8 PEM file, EC P-256 (ES256) or RSA (RS256), readable by its owner only.
pub fn load_assertion_key(path: &Path) -> Result<SigningKey, AuthError> {
    let invalid = |m: String| AuthError::Invalid(format!("private key {}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    check_private(path)?;
    let der = pem_decode(&text).filter(|_| text.contains("BEGIN PRIVATE KEY")).ok_or_else(|| {
        invalid(
            "expected a PKCS#8 PEM (-----BEGIN PRIVATE KEY-----); convert with `openssl pkcs8 -topk8 -nocrypt`".into(),
        )
    })?;
    SigningKey::from_pkcs8(KeyPurpose::AccessToken, &der, 0)
        .or_else(|_| SigningKey::from_pkcs8(KeyPurpose::IdToken, &der, 0))
        .map_err(|_| invalid("neither an EC P-256 nor an RSA private key".into()))
}

/// RFC 7638: base64url(SHA-256 of the required members in lexicographic order, no whitespace).
pub fn thumbprint(jwk: &Value) -> String {
    let canonical = match jwk["kty"].as_str() {
        Some("EC") => format!(r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#, jwk["crv"], jwk["x"], jwk["y"]),
        Some("RSA") => format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, jwk["e"], jwk["n"]),
        _ => jwk.to_string(),
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// A verification key built from a published JWK.
pub fn decoding_key(jwk: &Value) -> Result<(Algorithm, DecodingKey), AuthError> {
    let bad = |why: &str| AuthError::Internal(format!("published key unusable: {why}"));
    let alg = match jwk["alg"].as_str() {
        Some("ES256") => Algorithm::ES256,
        Some("RS256") => Algorithm::RS256,
        _ => return Err(bad("alg")),
    };
    let key = match alg {
        Algorithm::ES256 => DecodingKey::from_ec_components(
            jwk["x"].as_str().ok_or_else(|| bad("x"))?,
            jwk["y"].as_str().ok_or_else(|| bad("y"))?,
        ),
        _ => DecodingKey::from_rsa_components(
            jwk["n"].as_str().ok_or_else(|| bad("n"))?,
            jwk["e"].as_str().ok_or_else(|| bad("e"))?,
        ),
    }
    .map_err(|e| bad(&e.to_string()))?;
    Ok((alg, key))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_decode(text: &str) -> Option<Vec<u8>> {
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body.trim()).ok()
}

/// The signing keys of this process, kept in one directory: `<purpose>-<created ms>.pem`.
pub struct KeyRing {
    dir: PathBuf,
    keys: Vec<std::sync::Arc<SigningKey>>,
}

fn file_prefix(purpose: KeyPurpose) -> &'static str {
    match purpose {
        KeyPurpose::AccessToken => "access-token-es256",
        KeyPurpose::IdToken => "id-token-rs256",
        // Never written here (`not_a_token_key`); named so the match stays exhaustive.
        KeyPurpose::LogSeal => "log-seal",
    }
}

/// The log sealer keeps its own key (`cairn_log::seal`); the token key ring never makes or loads one.
fn not_a_token_key() -> AuthError {
    AuthError::Internal("log seal keys belong to the log sealer, not the token key ring".into())
}

impl KeyRing {
    /// Loads every key in `dir`, creating one of each purpose that has none. Files are written with
    /// mode 0600 in a 0700 directory; a key file anyone else may read is refused.
    pub fn load_or_create(dir: &Path) -> Result<KeyRing, AuthError> {
        let io = |e: std::io::Error| AuthError::Internal(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        restrict(dir, 0o700).map_err(io)?;
        let mut ring = KeyRing { dir: dir.to_owned(), keys: Vec::new() };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(stem) = name.strip_suffix(".pem") else { continue };
            let Some((prefix, created)) = stem.rsplit_once('-') else { continue };
            let purpose = match prefix {
                p if p == file_prefix(KeyPurpose::AccessToken) => KeyPurpose::AccessToken,
                p if p == file_prefix(KeyPurpose::IdToken) => KeyPurpose::IdToken,
                _ => continue,
            };
            let created_ms: i64 =
                created.parse().map_err(|_| AuthError::Internal(format!("{}: bad key file name", path.display())))?;
            check_private(&path)?;
            let text = std::fs::read_to_string(&path).map_err(io)?;
            let der =
                pem_decode(&text).ok_or_else(|| AuthError::Internal(format!("{}: not a PEM key", path.display())))?;
            ring.keys.push(std::sync::Arc::new(SigningKey::from_pkcs8(purpose, &der, created_ms)?));
        }
        for purpose in [KeyPurpose::AccessToken, KeyPurpose::IdToken] {
            if !ring.keys.iter().any(|k| k.purpose == purpose) {
                ring.create(purpose)?;
            }
        }
        ring.keys.sort_by_key(|k| k.created_ms);
        Ok(ring)
    }

    /// Creates a new key of `purpose` and writes it to disk; it becomes the newest. (Whether it may
    /// sign yet is the caller's business: only once its `auth.key.published` event is durable.)
    pub fn create(&mut self, purpose: KeyPurpose) -> Result<std::sync::Arc<SigningKey>, AuthError> {
        let key = self.generate(purpose)?;
        self.adopt(key.clone());
        Ok(key)
    }

    /// Creates a new key of `purpose` on disk without making it the signing key yet.
    pub fn generate(&self, purpose: KeyPurpose) -> Result<std::sync::Arc<SigningKey>, AuthError> {
        let der = SigningKey::generate(purpose)?;
        let created_ms = cairn_events::Timestamp::now()
            .as_millis()
            .max(self.keys.iter().map(|k| k.created_ms + 1).max().unwrap_or(0));
        let path = self.dir.join(format!("{}-{created_ms}.pem", file_prefix(purpose)));
        write_private(&path, pem_encode("PRIVATE KEY", &der).as_bytes())?;
        Ok(std::sync::Arc::new(SigningKey::from_pkcs8(purpose, &der, created_ms)?))
    }

    /// Makes a generated key the newest of its purpose (it signs from now on).
    pub fn adopt(&mut self, key: std::sync::Arc<SigningKey>) {
        self.keys.push(key);
        self.keys.sort_by_key(|k| k.created_ms);
    }

    pub fn keys(&self) -> &[std::sync::Arc<SigningKey>] {
        &self.keys
    }

    /// The newest key of a purpose.
    pub fn newest(&self, purpose: KeyPurpose) -> &std::sync::Arc<SigningKey> {
        self.keys.iter().rev().find(|k| k.purpose == purpose).expect("load_or_create makes one of each")
    }

    pub fn by_kid(&self, kid: &str) -> Option<&std::sync::Arc<SigningKey>> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
pub(crate) fn check_private(path: &Path) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| AuthError::Internal(format!("{}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(AuthError::Internal(format!(
            "{}: a key or secret file must be readable by its owner only (mode is {:o}); run chmod 600",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}
#[cfg(not(unix))]
pub(crate) fn check_private(_: &Path) -> Result<(), AuthError> {
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    use std::io::Write;
    let io = |e: std::io::Error| AuthError::Internal(format!("{}: {e}", path.display()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_private_and_reloaded_with_the_same_kid() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load_or_create(dir.path()).unwrap();
        let (a, i) = (ring.newest(KeyPurpose::AccessToken).kid.clone(), ring.newest(KeyPurpose::IdToken).kid.clone());
        assert_eq!(ring.newest(KeyPurpose::IdToken).public_jwk["alg"], "RS256");
        assert_eq!(ring.newest(KeyPurpose::AccessToken).public_jwk["crv"], "P-256");
        let again = KeyRing::load_or_create(dir.path()).unwrap();
        assert_eq!(again.keys().len(), 2);
        assert_eq!(again.newest(KeyPurpose::AccessToken).kid, a);
        assert_eq!(again.newest(KeyPurpose::IdToken).kid, i);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for e in std::fs::read_dir(dir.path()).unwrap() {
                let p = e.unwrap().path();
                assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
            let err = KeyRing::load_or_create(dir.path()).err().expect("a readable key is refused").to_string();
            assert!(err.contains("owner only"), "{err}");
        }
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 section 3.1.
        let jwk = json!({"kty": "RSA", "e": "AQAB", "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(thumbprint(&jwk), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }
}
