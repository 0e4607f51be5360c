//! The authorization server over a real embedded log: grants, every rule of client assertions and
//! access tokens, introspection, revocation, restarts.

use crate::client_auth::FormRequest;
use crate::server::{AdminCommand, AuthServer, AuthSettings};
use crate::token::{AccessClaims, TokenRejection};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cairn_events::{Actor, ClientKind, Event, EventType, topics};
use cairn_log::EventLog;
use cairn_log::embedded::{EmbeddedLog, EmbeddedOptions};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::sync::Arc;

const ISSUER: &str = "https://cairn.test";
const TOKEN_URL: &str = "https://cairn.test/token";

struct Fixture {
    _dir: tempfile::TempDir,
    log: Arc<dyn EventLog>,
    auth: Arc<AuthServer>,
    keys_dir: std::path::PathBuf,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path().join("log"), EmbeddedOptions::default()).unwrap());
    for t in topics::ALL {
        log.create_topic(t, 4).await.unwrap();
    }
    let keys_dir = dir.path().join("keys");
    let auth = AuthServer::start(log.clone(), Some(&keys_dir), AuthSettings::new(ISSUER)).await.unwrap();
    Fixture { _dir: dir, log, auth, keys_dir }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// A device gateway's own key pair.
struct ClientKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    public: Value,
}

fn es384_key(kid: &str) -> ClientKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
    let der = pair.to_pkcs8v1().unwrap();
    let point = pair.public_key().as_ref();
    ClientKey {
        kid: kid.into(),
        alg: Algorithm::ES384,
        encoding: EncodingKey::from_ec_der(der.as_ref()),
        public: json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384",
            "x": URL_SAFE_NO_PAD.encode(&point[1..49]), "y": URL_SAFE_NO_PAD.encode(&point[49..97])}),
    }
}

fn rs384_key(kid: &str) -> ClientKey {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der = pair.as_der().unwrap();
    let public = pair.public_key();
    ClientKey {
        kid: kid.into(),
        alg: Algorithm::RS384,
        encoding: EncodingKey::from_rsa_pem(pem("PRIVATE KEY", der.as_ref()).as_bytes()).unwrap(),
        public: json!({"kty": "RSA", "kid": kid, "alg": "RS384",
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero())}),
    }
}

fn now() -> i64 {
    crate::now_secs()
}

fn assertion(key: &ClientKey, claims: Value) -> String {
    let mut h = Header::new(key.alg);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, &claims, &key.encoding).unwrap()
}

fn good_claims(client: &str) -> Value {
    json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() + 240, "jti": uuid::Uuid::new_v4().to_string()})
}

fn backend_request(assertion: &str, scope: &str) -> FormRequest {
    FormRequest {
        params: vec![
            ("grant_type".into(), "client_credentials".into()),
            ("client_assertion_type".into(), crate::assertion::ASSERTION_TYPE.into()),
            ("client_assertion".into(), assertion.into()),
            ("scope".into(), scope.into()),
        ],
        basic: None,
    }
}

async fn register_gateway(f: &Fixture, keys: &[&ClientKey]) -> String {
    let out = f
        .auth
        .admin(AdminCommand::ClientRegister {
            name: "Glucose gateway".into(),
            kind: ClientKind::ConfidentialAsymmetric,
            client_id: Some("gateway-1".into()),
            redirect_uris: vec![],
            scope: "system/Observation.cru system/Device.rs".into(),
            jwks: Some(json!({"keys": keys.iter().map(|k| k.public.clone()).collect::<Vec<_>>()})),
            jwks_uri: None,
        })
        .await
        .unwrap();
    out["client_id"].as_str().unwrap().to_owned()
}

async fn events_of(log: &Arc<dyn EventLog>, t: EventType) -> Vec<Event> {
    let mut out = Vec::new();
    for p in 0..log.partitions(topics::AUTH).unwrap() {
        for r in log.read(topics::AUTH, p, 0, 100_000).await.unwrap() {
            let e = Event::from_canonical_bytes(&r.value).unwrap();
            if e.event_type() == t {
                out.push(e);
            }
        }
    }
    out
}

#[tokio::test]
async fn backend_services_grant_with_es384_and_rs384_assertions() {
    let f = fixture().await;
    let (es, rs) = (es384_key("es-1"), rs384_key("rs-1"));
    let client = register_gateway(&f, &[&es, &rs]).await;
    for key in [&es, &rs] {
        let req = backend_request(&assertion(key, good_claims(&client)), "system/Observation.cr system/Patient.r");
        let resp = f.auth.token(&req, &Actor::default()).await.unwrap();
        assert_eq!(resp["token_type"], "Bearer");
        assert_eq!(resp["scope"], "system/Observation.cr", "scopes the client may not have are dropped");
        assert!(resp["expires_in"].as_i64().unwrap() <= 300);
        let token = resp["access_token"].as_str().unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let v = f.auth.verify(token).await.unwrap();
        assert_eq!(v.claims.client_id, client);
        assert_eq!(v.claims.sub, client);
        assert_eq!(v.claims.aud, "https://cairn.test/fhir");
        assert_eq!(v.claims.iss, ISSUER);
    }
    let issued = events_of(&f.log, EventType::AuthTokenIssued).await;
    assert_eq!(issued.len(), 2, "every grant is an event");
    // The published key is in the JWKS and in the log.
    let kid = jsonwebtoken::decode_header(
        f.auth.token(&backend_request(&assertion(&es, good_claims(&client)), "system/Observation.r"), &Actor::default()).await.unwrap()
            ["access_token"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .kid
    .unwrap();
    assert!(f.auth.jwks()["keys"].as_array().unwrap().iter().any(|k| k["kid"] == kid.as_str()));
    assert!(events_of(&f.log, EventType::AuthKeyPublished).await.iter().any(|e| e.partition_key() == kid));
}

#[tokio::test]
async fn every_assertion_rule_is_enforced_and_every_refusal_recorded() {
    let f = fixture().await;
    let es = es384_key("es-1");
    let client = register_gateway(&f, &[&es]).await;
    let stranger = es384_key("es-1"); // same kid, different key
    let cases: Vec<(&str, String)> = vec![
        ("wrong aud", assertion(&es, json!({"iss": client, "sub": client, "aud": "https://elsewhere/token", "exp": now() + 60, "jti": "a1"}))),
        ("expired", assertion(&es, json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() - 120, "jti": "a2"}))),
        ("exp too far", assertion(&es, json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() + 600, "jti": "a3"}))),
        ("sub differs", assertion(&es, json!({"iss": client, "sub": "other", "aud": TOKEN_URL, "exp": now() + 60, "jti": "a4"}))),
        ("no jti", assertion(&es, json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() + 60}))),
        ("unknown kid", assertion(&es384_key("nope"), good_claims(&client))),
        ("bad signature", assertion(&stranger, good_claims(&client))),
        ("alg none", {
            let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"es-1"}"#);
            let c = URL_SAFE_NO_PAD.encode(good_claims(&client).to_string());
            format!("{h}.{c}.")
        }),
        ("HS256 with the public key", {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("es-1".into());
            jsonwebtoken::encode(&h, &good_claims(&client), &EncodingKey::from_secret(es.public.to_string().as_bytes()).unwrap()).unwrap()
        }),
        ("ES256 not allowed", {
            let pair = EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("es-1".into());
            jsonwebtoken::encode(&h, &good_claims(&client), &EncodingKey::from_ec_der(pair.to_pkcs8v1().unwrap().as_ref())).unwrap()
        }),
    ];
    for (name, jwt) in &cases {
        let err = f.auth.token(&backend_request(jwt, "system/Observation.r"), &Actor::default()).await.unwrap_err();
        assert_eq!(err.error, "invalid_client", "{name}: {err:?}");
        assert_eq!(err.status, 401, "{name}");
    }
    // Replay: the first use succeeds, the second is refused.
    let once = assertion(&es, good_claims(&client));
    f.auth.token(&backend_request(&once, "system/Observation.r"), &Actor::default()).await.unwrap();
    let err = f.auth.token(&backend_request(&once, "system/Observation.r"), &Actor::default()).await.unwrap_err();
    assert!(err.description.contains("already used"), "{err:?}");
    // Scope rules.
    let err = f.auth.token(&backend_request(&assertion(&es, good_claims(&client)), "patient/Observation.r"), &Actor::default()).await.unwrap_err();
    assert_eq!(err.error, "invalid_scope");
    let err = f.auth.token(&backend_request(&assertion(&es, good_claims(&client)), "system/Patient.r"), &Actor::default()).await.unwrap_err();
    assert_eq!(err.error, "invalid_scope");
    // No password or implicit grant.
    let req = FormRequest { params: vec![("grant_type".into(), "password".into())], basic: None };
    assert_eq!(f.auth.token(&req, &Actor::default()).await.unwrap_err().error, "unsupported_grant_type");

    let refused = events_of(&f.log, EventType::AuthTokenRefused).await;
    assert_eq!(refused.len(), cases.len() + 4, "every refusal is an event");
    for e in &refused {
        let text = String::from_utf8(e.canonical_bytes()).unwrap();
        assert!(!text.contains("eyJ"), "no token or assertion is recorded: {text}");
    }
}

#[tokio::test]
async fn symmetric_clients_use_basic_or_post_and_bad_secrets_are_refused() {
    let f = fixture().await;
    let out = f
        .auth
        .admin(AdminCommand::ClientRegister {
            name: "Lab system".into(),
            kind: ClientKind::ConfidentialSymmetric,
            client_id: None,
            redirect_uris: vec![],
            scope: "system/*.rs".into(),
            jwks: None,
            jwks_uri: None,
        })
        .await
        .unwrap();
    let (id, secret) = (out["client_id"].as_str().unwrap().to_owned(), out["client_secret"].as_str().unwrap().to_owned());
    let grant = |basic: Option<(String, String)>, extra: Vec<(String, String)>| {
        let mut params = vec![("grant_type".to_owned(), "client_credentials".to_owned()), ("scope".to_owned(), "system/Observation.rs".to_owned())];
        params.extend(extra);
        FormRequest { params, basic }
    };
    f.auth.token(&grant(Some((id.clone(), secret.clone())), vec![]), &Actor::default()).await.unwrap();
    f.auth
        .token(&grant(None, vec![("client_id".into(), id.clone()), ("client_secret".into(), secret.clone())]), &Actor::default())
        .await
        .unwrap();
    let err = f.auth.token(&grant(Some((id.clone(), "wrong".into())), vec![]), &Actor::default()).await.unwrap_err();
    assert_eq!((err.error, err.status), ("invalid_client", 401));
    // Two methods at once is a malformed request.
    let err = f
        .auth
        .token(&grant(Some((id.clone(), secret.clone())), vec![("client_secret".into(), secret.clone())]), &Actor::default())
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_request");
    // A repeated parameter too.
    let err = f
        .auth
        .token(&grant(Some((id.clone(), secret.clone())), vec![("scope".into(), "system/Observation.r".into())]), &Actor::default())
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_request");
    // Disabled clients get nothing, and their live tokens stop working.
    let live = f.auth.token(&grant(Some((id.clone(), secret.clone())), vec![]), &Actor::default()).await.unwrap();
    f.auth.admin(AdminCommand::ClientDisable { client_id: id.clone() }).await.unwrap();
    let err = f.auth.token(&grant(Some((id.clone(), secret.clone())), vec![]), &Actor::default()).await.unwrap_err();
    assert_eq!(err.error, "invalid_client");
    assert_eq!(f.auth.verify(live["access_token"].as_str().unwrap()).await.unwrap_err(), TokenRejection::ClientDisabled);
}

async fn symmetric_client(f: &Fixture, scope: &str) -> (String, String) {
    let out = f
        .auth
        .admin(AdminCommand::ClientRegister {
            name: "client".into(),
            kind: ClientKind::ConfidentialSymmetric,
            client_id: None,
            redirect_uris: vec![],
            scope: scope.into(),
            jwks: None,
            jwks_uri: None,
        })
        .await
        .unwrap();
    (out["client_id"].as_str().unwrap().to_owned(), out["client_secret"].as_str().unwrap().to_owned())
}

async fn token_for(f: &Fixture, creds: &(String, String), scope: &str) -> String {
    let req = FormRequest {
        params: vec![("grant_type".into(), "client_credentials".into()), ("scope".into(), scope.into())],
        basic: Some(creds.clone()),
    };
    f.auth.token(&req, &Actor::default()).await.unwrap()["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn access_token_rules_at_the_resource_server() {
    let f = fixture().await;
    let creds = symmetric_client(&f, "system/*.cruds").await;
    let token = token_for(&f, &creds, "system/Observation.rs").await;
    f.auth.verify(&token).await.unwrap();
    let claims: AccessClaims = jsonwebtoken::dangerous::insecure_decode(&token).unwrap().claims;
    let ring = crate::keys::KeyRing::load_or_create(&f.keys_dir).unwrap();
    let key = ring.newest(cairn_events::KeyPurpose::AccessToken);
    let resign = |typ: Option<&str>, c: &AccessClaims| {
        let mut h = Header::new(Algorithm::ES256);
        h.typ = typ.map(str::to_owned);
        h.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&h, c, &key.encoding).unwrap()
    };
    // Our own key, but the wrong typ, audience, issuer or time: all refused.
    assert_eq!(f.auth.verify(&resign(Some("JWT"), &claims)).await.unwrap_err(), TokenRejection::WrongType);
    assert_eq!(f.auth.verify(&resign(None, &claims)).await.unwrap_err(), TokenRejection::WrongType);
    let other_aud = AccessClaims { aud: "https://elsewhere/fhir".into(), ..claims.clone() };
    assert_eq!(f.auth.verify(&resign(Some("at+jwt"), &other_aud)).await.unwrap_err(), TokenRejection::WrongAudience);
    let other_iss = AccessClaims { iss: "https://evil".into(), ..claims.clone() };
    assert_eq!(f.auth.verify(&resign(Some("at+jwt"), &other_iss)).await.unwrap_err(), TokenRejection::WrongIssuer);
    let expired = AccessClaims { exp: now() - 120, ..claims.clone() };
    assert_eq!(f.auth.verify(&resign(Some("at+jwt"), &expired)).await.unwrap_err(), TokenRejection::Expired);
    let early = AccessClaims { nbf: Some(now() + 600), ..claims.clone() };
    assert_eq!(f.auth.verify(&resign(Some("at+jwt"), &early)).await.unwrap_err(), TokenRejection::NotYetValid);
    // Tampered payload, alg none, HS256 keyed with the public JWK, an unknown kid.
    let parts: Vec<&str> = token.split('.').collect();
    let wider = AccessClaims { scope: "system/*.cruds".into(), ..claims.clone() };
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wider).unwrap()), parts[2]);
    assert_eq!(f.auth.verify(&forged).await.unwrap_err(), TokenRejection::BadSignature);
    let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt"}"#), parts[1]);
    assert_eq!(f.auth.verify(&none).await.unwrap_err(), TokenRejection::Malformed);
    let mut hs = Header::new(Algorithm::HS256);
    hs.typ = Some("at+jwt".into());
    hs.kid = Some(key.kid.clone());
    let hs_token = jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(key.public_jwk.to_string().as_bytes()).unwrap()).unwrap();
    assert_eq!(f.auth.verify(&hs_token).await.unwrap_err(), TokenRejection::Algorithm);
    let mut unknown = Header::new(Algorithm::ES256);
    unknown.typ = Some("at+jwt".into());
    unknown.kid = Some("not-published".into());
    let unknown_token = jsonwebtoken::encode(&unknown, &claims, &key.encoding).unwrap();
    assert_eq!(f.auth.verify(&unknown_token).await.unwrap_err(), TokenRejection::UnknownKey);
    assert_eq!(f.auth.verify("not a jwt").await.unwrap_err(), TokenRejection::Malformed);
}

#[tokio::test]
async fn introspection_and_revocation() {
    let f = fixture().await;
    let rs = symmetric_client(&f, "system/*.rs").await;
    let app = symmetric_client(&f, "system/Observation.rs").await;
    let token = token_for(&f, &app, "system/Observation.rs").await;
    let ask = |creds: &(String, String), token: &str| FormRequest {
        params: vec![("token".into(), token.into())],
        basic: Some(creds.clone()),
    };
    let active = f.auth.introspect(&ask(&rs, &token), &Actor::default()).await.unwrap();
    assert_eq!(active["active"], true);
    assert_eq!(active["client_id"], app.0.as_str());
    assert_eq!(active["scope"], "system/Observation.rs");
    assert_eq!(f.auth.introspect(&ask(&rs, "garbage"), &Actor::default()).await.unwrap(), json!({"active": false}));
    // Introspection is protected.
    let anonymous = FormRequest { params: vec![("token".into(), token.clone())], basic: None };
    assert_eq!(f.auth.introspect(&anonymous, &Actor::default()).await.unwrap_err().error, "invalid_client");
    // Another client may not revoke it; unknown tokens are accepted silently; the owner revokes it.
    assert_eq!(f.auth.revoke(&ask(&rs, &token), &Actor::default()).await.unwrap_err().error, "unauthorized_client");
    f.auth.revoke(&ask(&app, "unknown-token"), &Actor::default()).await.unwrap();
    f.auth.revoke(&ask(&app, &token), &Actor::default()).await.unwrap();
    assert_eq!(f.auth.verify(&token).await.unwrap_err(), TokenRejection::Revoked);
    assert_eq!(f.auth.introspect(&ask(&rs, &token), &Actor::default()).await.unwrap(), json!({"active": false}));
    assert_eq!(events_of(&f.log, EventType::AuthTokenIntrospected).await.len(), 3);
    assert_eq!(events_of(&f.log, EventType::AuthTokenRevoked).await.len(), 1);
}

#[tokio::test]
async fn a_restarted_server_rebuilds_its_state_from_the_log() {
    let f = fixture().await;
    let creds = symmetric_client(&f, "system/*.rs").await;
    let token = token_for(&f, &creds, "system/Observation.rs").await;
    let revoked = token_for(&f, &creds, "system/Observation.rs").await;
    f.auth.revoke(&FormRequest { params: vec![("token".into(), revoked.clone())], basic: Some(creds.clone()) }, &Actor::default()).await.unwrap();
    f.auth
        .admin(AdminCommand::UserAdd { username: "alice".into(), password: "correct horse".into(), fhir_user: Some("Patient/p1".into()), roles: vec![] })
        .await
        .unwrap();
    let published = events_of(&f.log, EventType::AuthKeyPublished).await.len();
    let again = AuthServer::start(f.log.clone(), Some(&f.keys_dir), AuthSettings::new(ISSUER)).await.unwrap();
    again.verify(&token).await.unwrap();
    assert_eq!(again.verify(&revoked).await.unwrap_err(), TokenRejection::Revoked);
    assert_eq!(again.admin(AdminCommand::UserList).await.unwrap()[0]["username"], "alice");
    assert_eq!(events_of(&f.log, EventType::AuthKeyPublished).await.len(), published, "known keys are not published twice");
    // A second instance with its own keys: its tokens verify at the first once the log has them.
    let other_keys = tempfile::tempdir().unwrap();
    let second = AuthServer::start(f.log.clone(), Some(other_keys.path()), AuthSettings::new(ISSUER)).await.unwrap();
    let from_second = {
        let req = FormRequest {
            params: vec![("grant_type".into(), "client_credentials".into()), ("scope".into(), "system/Observation.rs".into())],
            basic: Some(creds.clone()),
        };
        second.token(&req, &Actor::default()).await.unwrap()["access_token"].as_str().unwrap().to_owned()
    };
    f.auth.verify(&from_second).await.unwrap();
}

#[tokio::test]
async fn admin_commands_validate_their_input() {
    let f = fixture().await;
    let reg = |kind, scope: &str, redirect: Vec<&str>, jwks: Option<Value>| AdminCommand::ClientRegister {
        name: "x".into(),
        kind,
        client_id: None,
        redirect_uris: redirect.into_iter().map(str::to_owned).collect(),
        scope: scope.into(),
        jwks,
        jwks_uri: None,
    };
    for (cmd, expect) in [
        (reg(ClientKind::Public, "patient/Observation.rs", vec![], None), "redirect URI"),
        (reg(ClientKind::Public, "patient/Observation.rs", vec!["http://app.example/cb"], None), "loopback"),
        (reg(ClientKind::Public, "patient/Observation.rs", vec!["https://app.example/cb#x"], None), "fragment"),
        (reg(ClientKind::ConfidentialSymmetric, "patient/Observation.xx", vec![], None), "scope"),
        (reg(ClientKind::ConfidentialAsymmetric, "system/*.rs", vec![], None), "JWK Set"),
        (
            reg(ClientKind::ConfidentialAsymmetric, "system/*.rs", vec![], Some(json!({"keys": [{"kty": "EC", "kid": "k", "crv": "P-384", "x": "a", "y": "b", "d": "secret"}]}))),
            "private key",
        ),
    ] {
        let err = f.auth.admin(cmd).await.unwrap_err().to_string();
        assert!(err.contains(expect), "{err} should mention {expect}");
    }
    let user = |name: &str, pw: &str| AdminCommand::UserAdd { username: name.into(), password: pw.into(), fhir_user: None, roles: vec![] };
    f.auth.admin(user("bob", "long enough pw")).await.unwrap();
    assert!(f.auth.admin(user("bob", "long enough pw")).await.unwrap_err().to_string().contains("already exists"));
    assert!(f.auth.admin(user("carol", "short")).await.unwrap_err().to_string().contains("8 characters"));
    assert!(f.auth.admin(user("bad name", "long enough pw")).await.unwrap_err().to_string().contains("username"));
    let created = events_of(&f.log, EventType::AuthUserCreated).await;
    let text = String::from_utf8(created[0].canonical_bytes()).unwrap();
    assert!(!text.contains("long enough pw") && text.contains("$argon2id$"), "only the hash is recorded");
}
