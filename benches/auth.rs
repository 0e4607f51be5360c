//! What authentication costs the FHIR API per request: verifying an RFC 9068 access token (ES256)
//! the first time it is seen, and every later time (the verified-token cache), including the
//! revocation and disabled-client checks that run on every request. Figures: docs/performance.md.

use cairn_auth::keys::KeyRing;
use cairn_auth::state::AuthState;
use cairn_auth::token::{self, AccessClaims, Verifier};
use cairn_events::{ClientKind, ClientRegistered, Event, KeyPublished, KeyPurpose, Payload};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const ISSUER: &str = "https://cairn.example";

fn setup() -> (tempfile::TempDir, AuthState, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let ring = KeyRing::load_or_create(dir.path()).unwrap();
    let key = ring.newest(KeyPurpose::AccessToken);
    let mut state = AuthState::default();
    state.apply(&Event::new(Payload::from(KeyPublished {
        kid: key.kid.clone(),
        alg: "ES256".into(),
        purpose: KeyPurpose::AccessToken,
        jwk: key.public_jwk.clone(),
        replaces: None,
    })));
    state.apply(&Event::new(Payload::from(ClientRegistered {
        client_id: "gateway".into(),
        client_name: "Gateway".into(),
        kind: ClientKind::ConfidentialSymmetric,
        redirect_uris: vec![],
        scope: "system/Observation.crs".into(),
        secret_sha256: Some("0".repeat(64)),
        jwks: None,
        jwks_uri: None,
        registered_by: "admin".into(),
    })));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let tokens = (0..1000)
        .map(|i| {
            let claims = AccessClaims {
                iss: ISSUER.into(),
                sub: "gateway".into(),
                aud: format!("{ISSUER}/fhir"),
                exp: now + 300,
                iat: now,
                nbf: None,
                jti: format!("jti-{i}"),
                client_id: "gateway".into(),
                scope: "system/Observation.crs".into(),
                patient: None,
                fhir_user: None,
                fam: None,
            };
            token::sign(&claims, key).unwrap()
        })
        .collect();
    (dir, state, tokens)
}

fn verify(c: &mut Criterion) {
    let (_dir, state, tokens) = setup();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut g = c.benchmark_group("access_token");
    g.bench_function("verify_first_sight", |b| {
        let mut i = 0;
        b.iter_batched(
            || {
                i = (i + 1) % tokens.len();
                (Verifier::new(ISSUER, format!("{ISSUER}/fhir")), &tokens[i])
            },
            |(v, t)| v.verify(t, &state, now).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let cached = Verifier::new(ISSUER, format!("{ISSUER}/fhir"));
    for t in &tokens {
        cached.verify(t, &state, now).unwrap();
    }
    g.bench_function("verify_cached", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % tokens.len();
            cached.verify(&tokens[i], &state, now).unwrap()
        })
    });
    g.finish();
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// The per-request check against a revocation list of one million revoked tokens, and the memory
/// the list takes (printed once).
fn revocation_list(c: &mut Criterion) {
    let (_dir, mut state, tokens) = setup();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let size = if std::env::args().any(|a| a == "--bench") { 1_000_000 } else { 10_000 };
    let before = rss_bytes();
    for i in 0..size {
        state.apply(&Event::new(Payload::from(cairn_events::TokenRevoked {
            target: cairn_events::RevocationTarget::Token {
                jti: uuid::Uuid::now_v7().to_string(),
                expires_at: cairn_events::Timestamp::from_millis((now + 300 + i as i64 % 60) * 1000),
            },
            reason: "bench".into(),
        })));
    }
    let after = rss_bytes();
    eprintln!(
        "revocation list: {size} revoked tokens take {:.1} MiB ({:.0} bytes each)",
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / size as f64
    );
    let cached = Verifier::new(ISSUER, format!("{ISSUER}/fhir"));
    for t in &tokens {
        cached.verify(t, &state, now).unwrap();
    }
    c.bench_function("access_token/verify_cached_with_1m_revoked", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % tokens.len();
            cached.verify(&tokens[i], &state, now).unwrap()
        })
    });
}

criterion_group!(benches, verify, revocation_list);
criterion_main!(benches);
