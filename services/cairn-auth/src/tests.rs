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
    let log: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(dir.path().join("log"), EmbeddedOptions::default()).unwrap());
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
        f.auth
            .token(&backend_request(&assertion(&es, good_claims(&client)), "system/Observation.r"), &Actor::default())
            .await
            .unwrap()["access_token"]
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
        (
            "wrong aud",
            assertion(
                &es,
                json!({"iss": client, "sub": client, "aud": "https://elsewhere/token", "exp": now() + 60, "jti": "a1"}),
            ),
        ),
        (
            "expired",
            assertion(&es, json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() - 120, "jti": "a2"})),
        ),
        (
            "exp too far",
            assertion(&es, json!({"iss": client, "sub": client, "aud": TOKEN_URL, "exp": now() + 600, "jti": "a3"})),
        ),
        (
            "sub differs",
            assertion(&es, json!({"iss": client, "sub": "other", "aud": TOKEN_URL, "exp": now() + 60, "jti": "a4"})),
        ),
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
            jsonwebtoken::encode(
                &h,
                &good_claims(&client),
                &EncodingKey::from_secret(es.public.to_string().as_bytes()).unwrap(),
            )
            .unwrap()
        }),
        ("ES256 not allowed", {
            let pair = EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("es-1".into());
            jsonwebtoken::encode(
                &h,
                &good_claims(&client),
                &EncodingKey::from_ec_der(pair.to_pkcs8v1().unwrap().as_ref()),
            )
            .unwrap()
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
    let err = f
        .auth
        .token(&backend_request(&assertion(&es, good_claims(&client)), "patient/Observation.r"), &Actor::default())
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_scope");
    let err = f
        .auth
        .token(&backend_request(&assertion(&es, good_claims(&client)), "system/Patient.r"), &Actor::default())
        .await
        .unwrap_err();
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
    let (id, secret) =
        (out["client_id"].as_str().unwrap().to_owned(), out["client_secret"].as_str().unwrap().to_owned());
    let grant = |basic: Option<(String, String)>, extra: Vec<(String, String)>| {
        let mut params = vec![
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            ("scope".to_owned(), "system/Observation.rs".to_owned()),
        ];
        params.extend(extra);
        FormRequest { params, basic }
    };
    f.auth.token(&grant(Some((id.clone(), secret.clone())), vec![]), &Actor::default()).await.unwrap();
    f.auth
        .token(
            &grant(None, vec![("client_id".into(), id.clone()), ("client_secret".into(), secret.clone())]),
            &Actor::default(),
        )
        .await
        .unwrap();
    let err = f.auth.token(&grant(Some((id.clone(), "wrong".into())), vec![]), &Actor::default()).await.unwrap_err();
    assert_eq!((err.error, err.status), ("invalid_client", 401));
    // Two methods at once is a malformed request.
    let err = f
        .auth
        .token(
            &grant(Some((id.clone(), secret.clone())), vec![("client_secret".into(), secret.clone())]),
            &Actor::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_request");
    // A repeated parameter too.
    let err = f
        .auth
        .token(
            &grant(Some((id.clone(), secret.clone())), vec![("scope".into(), "system/Observation.r".into())]),
            &Actor::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.error, "invalid_request");
    // Disabled clients get nothing, and their live tokens stop working.
    let live = f.auth.token(&grant(Some((id.clone(), secret.clone())), vec![]), &Actor::default()).await.unwrap();
    f.auth.admin(AdminCommand::ClientDisable { client_id: id.clone() }).await.unwrap();
    let err = f.auth.token(&grant(Some((id.clone(), secret.clone())), vec![]), &Actor::default()).await.unwrap_err();
    assert_eq!(err.error, "invalid_client");
    assert_eq!(
        f.auth.verify(live["access_token"].as_str().unwrap()).await.unwrap_err(),
        TokenRejection::ClientDisabled
    );
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
    let hs_token =
        jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(key.public_jwk.to_string().as_bytes()).unwrap())
            .unwrap();
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
    f.auth
        .revoke(
            &FormRequest { params: vec![("token".into(), revoked.clone())], basic: Some(creds.clone()) },
            &Actor::default(),
        )
        .await
        .unwrap();
    f.auth
        .admin(AdminCommand::UserAdd {
            username: "alice".into(),
            password: "correct horse".into(),
            fhir_user: Some("Patient/p1".into()),
            roles: vec![],
        })
        .await
        .unwrap();
    let published = events_of(&f.log, EventType::AuthKeyPublished).await.len();
    let again = AuthServer::start(f.log.clone(), Some(&f.keys_dir), AuthSettings::new(ISSUER)).await.unwrap();
    again.verify(&token).await.unwrap();
    assert_eq!(again.verify(&revoked).await.unwrap_err(), TokenRejection::Revoked);
    assert_eq!(again.admin(AdminCommand::UserList).await.unwrap()[0]["username"], "alice");
    assert_eq!(
        events_of(&f.log, EventType::AuthKeyPublished).await.len(),
        published,
        "known keys are not published twice"
    );
    // A second instance with its own keys: its tokens verify at the first once the log has them.
    let other_keys = tempfile::tempdir().unwrap();
    let second = AuthServer::start(f.log.clone(), Some(other_keys.path()), AuthSettings::new(ISSUER)).await.unwrap();
    let from_second = {
        let req = FormRequest {
            params: vec![
                ("grant_type".into(), "client_credentials".into()),
                ("scope".into(), "system/Observation.rs".into()),
            ],
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
            reg(
                ClientKind::ConfidentialAsymmetric,
                "system/*.rs",
                vec![],
                Some(json!({"keys": [{"kty": "EC", "kid": "k", "crv": "P-384", "x": "a", "y": "b", "d": "secret"}]})),
            ),
            "private key",
        ),
    ] {
        let err = f.auth.admin(cmd).await.unwrap_err().to_string();
        assert!(err.contains(expect), "{err} should mention {expect}");
    }
    let user = |name: &str, pw: &str| AdminCommand::UserAdd {
        username: name.into(),
        password: pw.into(),
        fhir_user: None,
        roles: vec![],
    };
    f.auth.admin(user("bob", "long enough pw")).await.unwrap();
    assert!(f.auth.admin(user("bob", "long enough pw")).await.unwrap_err().to_string().contains("already exists"));
    assert!(f.auth.admin(user("carol", "short")).await.unwrap_err().to_string().contains("8 characters"));
    assert!(f.auth.admin(user("bad name", "long enough pw")).await.unwrap_err().to_string().contains("username"));
    let created = events_of(&f.log, EventType::AuthUserCreated).await;
    let text = String::from_utf8(created[0].canonical_bytes()).unwrap();
    assert!(!text.contains("long enough pw") && text.contains("$argon2id$"), "only the hash is recorded");
}

// ---------------------------------------------------------------- the authorization code flow

const APP_REDIRECT: &str = "https://app.example/callback";

async fn app_and_patient(f: &Fixture) -> (String, crate::state::User) {
    f.auth
        .admin(AdminCommand::ClientRegister {
            name: "Growth chart".into(),
            kind: ClientKind::Public,
            client_id: Some("growth-chart".into()),
            redirect_uris: vec![APP_REDIRECT.into()],
            scope: "launch/patient openid fhirUser offline_access patient/Observation.rs patient/Patient.r".into(),
            jwks: None,
            jwks_uri: None,
        })
        .await
        .unwrap();
    f.auth
        .admin(AdminCommand::UserAdd {
            username: "pat".into(),
            password: "patient password".into(),
            fhir_user: Some("Patient/p-1".into()),
            roles: vec![],
        })
        .await
        .unwrap();
    let user = f.auth.read_state(|s| s.user_by_name("pat").cloned()).unwrap();
    ("growth-chart".into(), user)
}

fn verifier() -> String {
    crate::random_token(48)
}

fn challenge(v: &str) -> String {
    use sha2::Digest;
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(v.as_bytes()))
}

fn authorize_params(challenge: &str, scope: &str) -> Vec<(String, String)> {
    [
        ("response_type", "code"),
        ("client_id", "growth-chart"),
        ("redirect_uri", APP_REDIRECT),
        ("scope", scope),
        ("state", "st-1"),
        ("aud", "https://cairn.test/fhir"),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
        ("nonce", "n-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Signs in, consents to everything asked, returns the code.
async fn code_for(f: &Fixture, v: &str, scope: &str) -> String {
    let req = f.auth.authorize_request(&authorize_params(&challenge(v), scope)).unwrap();
    let signed_in = f.auth.login("pat", "patient password", &Actor::default()).await.unwrap();
    let user = f.auth.session_user(&signed_in.cookie).unwrap();
    let all: Vec<String> = req.scopes.iter().map(|s| s.to_string()).collect();
    let url = f.auth.decide(&req, &user, &signed_in.cookie, Some(&all), None, &Actor::default()).await.unwrap();
    assert_eq!(query_param(&url, "state").as_deref(), Some("st-1"));
    assert_eq!(query_param(&url, "iss").as_deref(), Some(ISSUER));
    query_param(&url, "code").unwrap()
}

fn code_exchange(code: &str, v: &str) -> FormRequest {
    FormRequest {
        params: vec![
            ("grant_type".into(), "authorization_code".into()),
            ("code".into(), code.into()),
            ("redirect_uri".into(), APP_REDIRECT.into()),
            ("client_id".into(), "growth-chart".into()),
            ("code_verifier".into(), v.into()),
        ],
        basic: None,
    }
}

#[tokio::test]
async fn standalone_launch_gives_patient_context_id_token_and_refresh() {
    let f = fixture().await;
    app_and_patient(&f).await;
    let v = verifier();
    let code = code_for(&f, &v, "launch/patient openid fhirUser offline_access patient/Observation.rs").await;
    let t = f.auth.token(&code_exchange(&code, &v), &Actor::default()).await.unwrap();
    assert_eq!(t["patient"], "p-1");
    assert_eq!(t["need_patient_banner"], true);
    assert!(t["smart_style_url"].as_str().unwrap().starts_with(ISSUER));
    let access = f.auth.verify(t["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(access.claims.patient.as_deref(), Some("p-1"));
    assert_eq!(access.claims.fhir_user.as_deref(), Some("Patient/p-1"));
    // The ID token: RS256, our key, the nonce, fhirUser.
    let id = t["id_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(id).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    let claims: Value = jsonwebtoken::dangerous::insecure_decode(id).unwrap().claims;
    assert_eq!((claims["aud"].as_str(), claims["nonce"].as_str()), (Some("growth-chart"), Some("n-1")));
    assert_eq!(claims["fhirUser"], "https://cairn.test/fhir/Patient/p-1");
    let info = f.auth.userinfo(&access).unwrap();
    assert_eq!(info["fhirUser"], "https://cairn.test/fhir/Patient/p-1");

    // Refresh rotates; the old refresh token presented again revokes the whole family.
    let r1 = t["refresh_token"].as_str().unwrap().to_owned();
    let refresh = |r: &str| FormRequest {
        params: vec![
            ("grant_type".into(), "refresh_token".into()),
            ("refresh_token".into(), r.into()),
            ("client_id".into(), "growth-chart".into()),
        ],
        basic: None,
    };
    let t2 = f.auth.token(&refresh(&r1), &Actor::default()).await.unwrap();
    let r2 = t2["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    let a2 = t2["access_token"].as_str().unwrap().to_owned();
    f.auth.verify(&a2).await.unwrap();
    let narrower = FormRequest {
        params: vec![
            ("grant_type".into(), "refresh_token".into()),
            ("refresh_token".into(), r2.clone()),
            ("client_id".into(), "growth-chart".into()),
            ("scope".into(), "patient/Observation.rs user/Observation.rs".into()),
        ],
        basic: None,
    };
    assert_eq!(
        f.auth.token(&narrower, &Actor::default()).await.unwrap_err().error,
        "invalid_scope",
        "a refresh cannot widen"
    );
    let err = f.auth.token(&refresh(&r1), &Actor::default()).await.unwrap_err();
    assert_eq!(err.error, "invalid_grant");
    assert_eq!(
        f.auth.verify(&a2).await.unwrap_err(),
        TokenRejection::Revoked,
        "reuse revokes the family's access tokens"
    );
    assert_eq!(f.auth.token(&refresh(&r2), &Actor::default()).await.unwrap_err().error, "invalid_grant");
    let revoked = events_of(&f.log, EventType::AuthTokenRevoked).await;
    assert!(revoked.iter().any(|e| String::from_utf8(e.canonical_bytes()).unwrap().contains("refresh_token_reuse")));
}

#[tokio::test]
async fn every_code_rule_is_enforced() {
    let f = fixture().await;
    app_and_patient(&f).await;
    // PKCE: wrong verifier, missing verifier.
    let v = verifier();
    let code = code_for(&f, &v, "patient/Observation.rs").await;
    let wrong = f.auth.token(&code_exchange(&code, &verifier()), &Actor::default()).await.unwrap_err();
    assert!(wrong.error == "invalid_grant" && wrong.description.contains("PKCE"), "{wrong:?}");
    let mut missing = code_exchange(&code, &v);
    missing.params.retain(|(k, _)| k != "code_verifier");
    assert_eq!(f.auth.token(&missing, &Actor::default()).await.unwrap_err().error, "invalid_grant");
    // Redirect URI must match exactly.
    let mut other = code_exchange(&code, &v);
    other.params[2].1 = "https://app.example/callback/".into();
    assert_eq!(f.auth.token(&other, &Actor::default()).await.unwrap_err().error, "invalid_grant");
    // The right exchange works once; the second use revokes what the first gave.
    let t = f.auth.token(&code_exchange(&code, &v), &Actor::default()).await.unwrap();
    let access = t["access_token"].as_str().unwrap().to_owned();
    f.auth.verify(&access).await.unwrap();
    let again = f.auth.token(&code_exchange(&code, &v), &Actor::default()).await.unwrap_err();
    assert!(again.description.contains("already used"), "{again:?}");
    assert_eq!(f.auth.verify(&access).await.unwrap_err(), TokenRejection::Revoked);

    // The authorization request: PKCE mandatory, plain refused, aud required and ours.
    let c = challenge(&verifier());
    let mut p = authorize_params(&c, "patient/Observation.rs");
    p.retain(|(k, _)| k != "code_challenge_method");
    let err = f.auth.authorize_request(&p).unwrap_err();
    assert!(
        matches!(&err, crate::flow::AuthorizeError::Redirect(u) if u.contains("error=invalid_request") && u.contains("state=st-1")),
        "{err:?}"
    );
    let mut p = authorize_params(&c, "patient/Observation.rs");
    p.iter_mut().find(|(k, _)| k == "code_challenge_method").unwrap().1 = "plain".into();
    assert!(
        matches!(f.auth.authorize_request(&p).unwrap_err(), crate::flow::AuthorizeError::Redirect(u) if u.contains("S256"))
    );
    let mut p = authorize_params(&c, "patient/Observation.rs");
    p.iter_mut().find(|(k, _)| k == "aud").unwrap().1 = "https://elsewhere/fhir".into();
    assert!(
        matches!(f.auth.authorize_request(&p).unwrap_err(), crate::flow::AuthorizeError::Redirect(u) if u.contains("aud"))
    );
    // An unregistered redirect URI is never redirected to.
    let mut p = authorize_params(&c, "patient/Observation.rs");
    p.iter_mut().find(|(k, _)| k == "redirect_uri").unwrap().1 = "https://evil.example/cb".into();
    assert!(matches!(f.auth.authorize_request(&p).unwrap_err(), crate::flow::AuthorizeError::Page(_)));
    // Implicit flow is not offered.
    let mut p = authorize_params(&c, "patient/Observation.rs");
    p.iter_mut().find(|(k, _)| k == "response_type").unwrap().1 = "token".into();
    assert!(
        matches!(f.auth.authorize_request(&p).unwrap_err(), crate::flow::AuthorizeError::Redirect(u) if u.contains("unsupported_response_type"))
    );
}

#[tokio::test]
async fn consent_can_withhold_scopes_and_refusal_is_recorded() {
    let f = fixture().await;
    let (_, user) = app_and_patient(&f).await;
    let v = verifier();
    let req = f
        .auth
        .authorize_request(&authorize_params(&challenge(&v), "openid patient/Observation.rs patient/Patient.r"))
        .unwrap();
    let s = f.auth.login("pat", "patient password", &Actor::default()).await.unwrap();
    let url = f
        .auth
        .decide(&req, &user, &s.cookie, Some(&["patient/Observation.rs".to_owned()]), None, &Actor::default())
        .await
        .unwrap();
    let t = f.auth.token(&code_exchange(&query_param(&url, "code").unwrap(), &v), &Actor::default()).await.unwrap();
    assert_eq!(t["scope"], "patient/Observation.rs", "the token carries exactly what was granted");
    assert!(t.get("id_token").is_none());
    let nothing = f.auth.decide(&req, &user, &s.cookie, Some(&[]), None, &Actor::default()).await.unwrap_err();
    assert!(matches!(&nothing, crate::flow::AuthorizeError::Page(m) if m.contains("at least one")), "{nothing:?}");
    let url = f.auth.decide(&req, &user, &s.cookie, None, None, &Actor::default()).await.unwrap();
    assert_eq!(query_param(&url, "error").as_deref(), Some("access_denied"));
    let consents = events_of(&f.log, EventType::AuthConsentRecorded).await;
    assert_eq!(consents.len(), 2);
}

#[tokio::test]
async fn sign_in_is_throttled_and_sessions_end_at_logout() {
    let f = fixture().await;
    app_and_patient(&f).await;
    let from = Actor { source_address: Some("198.51.100.7".into()), ..Actor::default() };
    for _ in 0..crate::state::MAX_FAILURES_PER_USER {
        let r = f.auth.login("pat", "wrong password", &from).await.err().unwrap();
        assert_eq!(r.0, "Wrong username or password.");
    }
    f.auth.catch_up().await.unwrap();
    let locked = f.auth.login("pat", "patient password", &from).await.err().unwrap();
    assert!(locked.0.starts_with("Too many"), "{locked:?}");
    // An unknown user reads the same as a wrong password.
    assert_eq!(
        f.auth.login("nobody", "whatever", &Actor::default()).await.err().unwrap().0,
        "Wrong username or password."
    );
    let failed = events_of(&f.log, EventType::AuthLoginFailed).await;
    assert!(failed.iter().any(|e| String::from_utf8(e.canonical_bytes()).unwrap().contains("throttled")));
    assert!(failed.iter().all(|e| !String::from_utf8(e.canonical_bytes()).unwrap().contains("wrong password")));

    let other = fixture().await;
    app_and_patient(&other).await;
    let s = other.auth.login("pat", "patient password", &Actor::default()).await.unwrap();
    assert!(other.auth.session_user(&s.cookie).is_some());
    assert!(other.auth.logout(&s.cookie, &Actor::default()).await.unwrap());
    assert!(other.auth.session_user(&s.cookie).is_none());
}

#[test]
fn sha256_hex_is_lowercase_hex_of_the_digest() {
    assert_eq!(crate::sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// ---------------------------------------------------------------- the revocation feed's lag bound

/// A log whose end offsets can be made to run ahead of what can be read: from this process's point
/// of view its feed has stopped while the log moves on.
struct LaggingLog {
    inner: Arc<dyn EventLog>,
    lag: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl EventLog for LaggingLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> cairn_log::Result<()> {
        self.inner.create_topic(topic, partitions).await
    }
    fn topics(&self) -> Vec<cairn_log::TopicInfo> {
        self.inner.topics()
    }
    fn partitions(&self, topic: &str) -> cairn_log::Result<u32> {
        self.inner.partitions(topic)
    }
    async fn append_batch(&self, records: Vec<cairn_log::NewRecord>) -> cairn_log::Result<Vec<cairn_log::Position>> {
        self.inner.append_batch(records).await
    }
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> cairn_log::Result<Vec<cairn_log::Record>> {
        self.inner.read(topic, partition, from, max).await
    }
    async fn end_offset(&self, topic: &str, partition: u32) -> cairn_log::Result<u64> {
        let end = self.inner.end_offset(topic, partition).await?;
        Ok(end + u64::from(self.lag.load(std::sync::atomic::Ordering::Relaxed)))
    }
    fn tail(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> futures_util::stream::BoxStream<'static, cairn_log::Result<cairn_log::Tailed>> {
        self.inner.tail(topic, partition, from)
    }
    async fn commit_offset(&self, group: &str, topic: &str, partition: u32, next_offset: u64) -> cairn_log::Result<()> {
        self.inner.commit_offset(group, topic, partition, next_offset).await
    }
    async fn committed_offset(&self, group: &str, topic: &str, partition: u32) -> cairn_log::Result<Option<u64>> {
        self.inner.committed_offset(group, topic, partition).await
    }
}

#[tokio::test]
async fn a_lagging_revocation_feed_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let embedded: Arc<dyn EventLog> =
        Arc::new(EmbeddedLog::open(dir.path().join("log"), EmbeddedOptions::default()).unwrap());
    for t in topics::ALL {
        embedded.create_topic(t, 2).await.unwrap();
    }
    let lagging = Arc::new(LaggingLog { inner: embedded, lag: std::sync::atomic::AtomicBool::new(false) });
    let settings = AuthSettings { feed_lag_bound: std::time::Duration::from_millis(400), ..AuthSettings::new(ISSUER) };
    let auth = AuthServer::start(lagging.clone(), Some(&dir.path().join("keys")), settings).await.unwrap();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        log: lagging.clone(),
        auth: auth.clone(),
        keys_dir: dir.path().join("keys"),
    };
    let creds = symmetric_client(&f, "system/*.rs").await;
    let token = token_for(&f, &creds, "system/Observation.rs").await;
    auth.verify(&token).await.unwrap();

    lagging.lag.store(true, std::sync::atomic::Ordering::Relaxed);
    let stopped = std::time::Instant::now();
    let refused_after = loop {
        match auth.verify(&token).await {
            Ok(_) => assert!(stopped.elapsed() < std::time::Duration::from_secs(5), "never failed closed"),
            Err(TokenRejection::FeedBehind) => break stopped.elapsed(),
            Err(other) => panic!("{other:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(refused_after >= std::time::Duration::from_millis(300), "refused before the bound: {refused_after:?}");
    let ask = FormRequest { params: vec![("token".into(), token.clone())], basic: Some(creds.clone()) };
    assert_eq!(auth.introspect(&ask, &Actor::default()).await.unwrap_err().error, "temporarily_unavailable");

    lagging.lag.store(false, std::sync::atomic::Ordering::Relaxed);
    let resumed = std::time::Instant::now();
    while auth.verify(&token).await.is_err() {
        assert!(resumed.elapsed() < std::time::Duration::from_secs(5), "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn logout_and_user_disable_end_the_users_live_tokens() {
    let f = fixture().await;
    app_and_patient(&f).await;
    let v = verifier();
    let code = code_for(&f, &v, "patient/Observation.rs").await;
    let t = f.auth.token(&code_exchange(&code, &v), &Actor::default()).await.unwrap();
    let access = t["access_token"].as_str().unwrap().to_owned();
    f.auth.verify(&access).await.unwrap();
    let s = f.auth.login("pat", "patient password", &Actor::default()).await.unwrap();
    assert!(f.auth.logout(&s.cookie, &Actor::default()).await.unwrap());
    assert_eq!(f.auth.verify(&access).await.unwrap_err(), TokenRejection::Revoked, "logout cuts the user's tokens off");

    let other = fixture().await;
    app_and_patient(&other).await;
    let v = verifier();
    let code = code_for(&other, &v, "patient/Observation.rs").await;
    let t = other.auth.token(&code_exchange(&code, &v), &Actor::default()).await.unwrap();
    let access = t["access_token"].as_str().unwrap().to_owned();
    other.auth.verify(&access).await.unwrap();
    other.auth.admin(AdminCommand::UserDisable { username: "pat".into() }).await.unwrap();
    assert_eq!(other.auth.verify(&access).await.unwrap_err(), TokenRejection::UserDisabled);
    assert!(
        other.auth.login("pat", "patient password", &Actor::default()).await.is_err(),
        "a disabled user cannot sign in"
    );
}

#[tokio::test]
async fn tokens_with_unknown_kids_share_catch_ups_and_new_keys_still_verify() {
    let f = fixture().await;
    let creds = symmetric_client(&f, "system/*.rs").await;
    let token = token_for(&f, &creds, "system/Observation.rs").await;
    let claims: AccessClaims = jsonwebtoken::dangerous::insecure_decode(&token).unwrap().claims;
    let ring = crate::keys::KeyRing::load_or_create(&f.keys_dir).unwrap();
    let key = ring.newest(cairn_events::KeyPurpose::AccessToken).clone();
    let forged: Vec<String> = (0..50)
        .map(|i| {
            let mut h = Header::new(Algorithm::ES256);
            h.typ = Some("at+jwt".into());
            h.kid = Some(format!("made-up-{i}"));
            jsonwebtoken::encode(&h, &claims, &key.encoding).unwrap()
        })
        .collect();
    let checks = forged.iter().map(|t| f.auth.verify(t));
    for r in futures_util::future::join_all(checks).await {
        assert_eq!(r.unwrap_err(), TokenRejection::UnknownKey);
    }
    // Meanwhile another instance publishes its key and signs: still accepted here at once.
    let other_keys = tempfile::tempdir().unwrap();
    let second = AuthServer::start(f.log.clone(), Some(other_keys.path()), AuthSettings::new(ISSUER)).await.unwrap();
    let req = FormRequest {
        params: vec![
            ("grant_type".into(), "client_credentials".into()),
            ("scope".into(), "system/Observation.rs".into()),
        ],
        basic: Some(creds.clone()),
    };
    let from_second = second.token(&req, &Actor::default()).await.unwrap()["access_token"].as_str().unwrap().to_owned();
    f.auth.verify(&from_second).await.unwrap();
}

/// Revoked families are remembered while any of their tokens can live, and forgotten after, so the
/// list stays bounded; a replay prunes the same way (time comes from the events).
#[test]
fn revoked_families_are_forgotten_once_their_tokens_have_expired() {
    use cairn_events::{CodeIssued, CodeRedeemed, RevocationTarget, Timestamp, TokenIssued, TokenKind, TokenRevoked};
    let at = |ms: i64| Timestamp::from_millis(ms);
    let event = |payload: cairn_events::Payload, ms: i64| {
        let mut e = Event::new(payload);
        e.occurred_at = at(ms);
        e
    };
    let mut state = crate::state::AuthState::default();
    let start_family = |state: &mut crate::state::AuthState, family: &str, t0: i64, token_life_ms: i64| {
        let code = CodeIssued {
            code_hash: format!("code-{family}"),
            client_id: "app".into(),
            user_id: "u-1".into(),
            redirect_uri: "https://app.example/cb".into(),
            scope: "patient/Observation.rs offline_access".into(),
            code_challenge: "c".into(),
            nonce: None,
            patient: Some("p-1".into()),
            fhir_user: None,
            session_id: "s".into(),
            auth_time: at(t0),
            expires_at: at(t0 + 60_000),
            authenticator: None,
        };
        state.apply(&event(code.into(), t0));
        let redeemed =
            CodeRedeemed { code_hash: format!("code-{family}"), client_id: "app".into(), family_id: family.into() };
        state.apply(&event(redeemed.into(), t0));
        let issued = TokenIssued {
            jti: format!("refresh-{family}"),
            kind: TokenKind::Refresh,
            grant_type: "authorization_code".into(),
            client_id: "app".into(),
            subject: Some("u-1".into()),
            scope: "patient/Observation.rs offline_access".into(),
            audience: "https://cairn.test/fhir".into(),
            issued_at: at(t0),
            expires_at: at(t0 + token_life_ms),
            family_id: Some(family.into()),
            kid: None,
            rotated_from: None,
        };
        state.apply(&event(issued.into(), t0));
    };
    let day = 86_400_000;
    let t0 = 1_795_000_000_000;
    start_family(&mut state, "short", t0, 900_000);
    start_family(&mut state, "offline", t0, 30 * day);
    for f in ["short", "offline"] {
        let revoked = TokenRevoked {
            target: RevocationTarget::Family { family_id: f.into() },
            reason: "refresh_token_reuse".into(),
        };
        state.apply(&event(revoked.into(), t0 + 1000));
    }
    assert!(state.is_family_revoked("short") && state.is_family_revoked("offline"));
    // A day later, many new families: the short-lived revoked family is forgotten, the one whose
    // refresh token still lives is not.
    for i in 0..2000 {
        start_family(&mut state, &format!("f-{i}"), t0 + day + i, 900_000);
    }
    assert!(!state.is_family_revoked("short"), "a family whose tokens all expired is still remembered");
    assert!(state.is_family_revoked("offline"), "a family with a live refresh token was forgotten");
    // A month later every one of them is gone.
    for i in 0..4000 {
        start_family(&mut state, &format!("g-{i}"), t0 + 31 * day + i, 900_000);
    }
    assert!(!state.is_family_revoked("offline"));
    let (known, revoked) = state.remembered_families();
    assert_eq!(revoked, 0);
    assert!(known <= 4000, "{known} families remembered; the 2,000 of a month ago should be gone");
}

// ---------------------------------------------------------------- federation

fn idp_config(dir: &std::path::Path, idp_id: &str, provision_role: Option<&str>) -> crate::federation::IdpConfig {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join(format!("{idp_id}.secret"));
    std::fs::write(&secret, "an upstream secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    crate::federation::IdpConfig {
        idp_id: idp_id.into(),
        display_name: "Hospital ID".into(),
        issuer: "https://login.hospital.example".into(),
        client_id: "cairn".into(),
        client_auth_method: "client_secret_basic".into(),
        client_secret_file: Some(secret.display().to_string()),
        private_key_file: None,
        scopes: vec![],
        userinfo: false,
        provision_role: provision_role.map(str::to_owned),
    }
}

fn upstream(subject: &str) -> cairn_events::Authenticator {
    cairn_events::Authenticator {
        issuer: "https://login.hospital.example".into(),
        subject: subject.into(),
        acr: None,
        amr: vec!["pwd".into()],
    }
}

#[tokio::test]
async fn an_upstream_identity_signs_in_only_as_the_user_it_is_linked_to() {
    let f = fixture().await;
    let secrets = tempfile::tempdir().unwrap();
    let actor = Actor::default();
    assert!(f.auth.register_idp(&idp_config(secrets.path(), "hospital", None), "config").await.unwrap());
    assert!(!f.auth.register_idp(&idp_config(secrets.path(), "hospital", None), "config").await.unwrap());
    for name in ["alice", "bob"] {
        let add = AdminCommand::UserAdd {
            username: name.into(),
            password: "a long password".into(),
            fhir_user: None,
            roles: vec![],
        };
        f.auth.admin(add).await.unwrap();
    }
    let unlinked = f.auth.federated_login("hospital", upstream("u-1"), &actor).await.unwrap_err();
    assert!(unlinked.0.contains("not linked") && unlinked.0.contains("u-1"), "{}", unlinked.0);
    let link =
        |user: &str| AdminCommand::UserLink { username: user.into(), idp_id: "hospital".into(), subject: "u-1".into() };
    f.auth.admin(link("alice")).await.unwrap();
    let again = f.auth.admin(link("bob")).await.unwrap_err().to_string();
    assert!(again.contains("already linked to user `alice`"), "{again}");
    let signed_in = f.auth.federated_login("hospital", upstream("u-1"), &actor).await.unwrap();
    let alice = f.auth.read_state(|s| s.user_by_name("alice").unwrap().account.user_id.clone());
    assert_eq!(signed_in.user_id, alice);
    let session = f.auth.read_state(|s| s.session(&crate::sha256_hex(signed_in.cookie.as_bytes())).cloned()).unwrap();
    assert_eq!(session.authenticator, Some(upstream("u-1")), "the session remembers who vouched");
    // Another issuer with the same subject is another identity.
    let elsewhere = cairn_events::Authenticator { issuer: "https://other.example".into(), ..upstream("u-1") };
    assert!(f.auth.federated_login("hospital", elsewhere, &actor).await.is_err());
    // A disabled provider signs nobody in, and ends the sessions it vouched for; a restart that
    // reads the provider from the config file again does not enable it.
    assert!(f.auth.session_user(&signed_in.cookie).is_some());
    f.auth.admin(AdminCommand::IdpDisable { idp_id: "hospital".into() }).await.unwrap();
    assert!(f.auth.enabled_idp("hospital").is_none());
    assert!(f.auth.session_user(&signed_in.cookie).is_none(), "the provider's sessions end with it");
    assert!(f.auth.federated_login("hospital", upstream("u-1"), &actor).await.is_err());
    assert!(!f.auth.register_idp(&idp_config(secrets.path(), "hospital", None), "config").await.unwrap());
    assert!(f.auth.enabled_idp("hospital").is_none(), "the config file does not undo an admin's disable");
    // An admin enables it again; a disabled user stays out, whoever vouches.
    assert!(f.auth.register_idp(&idp_config(secrets.path(), "hospital", None), "admin").await.unwrap());
    f.auth.admin(AdminCommand::UserDisable { username: "alice".into() }).await.unwrap();
    assert!(f.auth.federated_login("hospital", upstream("u-1"), &actor).await.is_err());
}

#[tokio::test]
async fn concurrent_first_sign_ins_provision_one_linked_user() {
    let f = fixture().await;
    let secrets = tempfile::tempdir().unwrap();
    f.auth.register_idp(&idp_config(secrets.path(), "citizen", Some("patient")), "admin").await.unwrap();
    let actor = Actor::default();
    let (a, b) = tokio::join!(
        f.auth.federated_login("citizen", upstream("c-9"), &actor),
        f.auth.federated_login("citizen", upstream("c-9"), &actor)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.user_id, b.user_id, "both sign-ins are the one linked user");
    let user = f.auth.read_state(|s| s.user(&a.user_id).cloned()).unwrap();
    assert_eq!(user.account.roles, vec!["patient".to_owned()]);
    assert!(user.account.password_hash.is_empty());
    assert_eq!(f.auth.read_state(|s| s.users().count()), 1, "one account, not two with one name");
    // No password opens an account that has none (not the empty one, not the old fixed decoy).
    for guess in ["", "decoy password, never matches", "a long password"] {
        assert!(f.auth.login(&user.account.username, guess, &actor).await.is_err(), "{guess:?}");
    }
    // A changed secret file is noticed, not used silently.
    std::fs::write(secrets.path().join("citizen.secret"), "another secret\n").unwrap();
    let idp = f.auth.enabled_idp("citizen").unwrap();
    let err = crate::federation::UpstreamCredential::load(&idp.registration.client_auth).unwrap_err().to_string();
    assert!(err.contains("changed since the provider was registered"), "{err}");
}
