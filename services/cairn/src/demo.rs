//! `cairn serve --demo`: a demo patient, practitioner and auditor, a demo SMART app and a demo device
//! client, so a new user can try every flow at once. Seeded through the same admin commands as
//! `cairn admin` (so every account is an event), once per data directory; the credentials are kept
//! in `<data dir>/demo-credentials.json` (mode 0600) and printed at every start.

use anyhow::Context;
use cairn_auth::{AdminCommand, AuthServer};
use cairn_events::ClientKind;
use cairn_service::{Access, FhirService, RequestContext};
use serde_json::{Value, json};
use std::path::Path;

pub const DEMO_APP_REDIRECT: &str = "http://localhost:4000/callback";

pub async fn seed(data_dir: &Path, public_url: &str, auth: &AuthServer, fhir: &FhirService) -> anyhow::Result<()> {
    let file = data_dir.join("demo-credentials.json");
    let credentials: Value = if file.exists() {
        serde_json::from_str(&std::fs::read_to_string(&file)?).context("demo-credentials.json")?
    } else {
        let mut users = Vec::new();
        for (username, fhir_user, role) in [
            ("demo-patient", Some("Patient/demo-patient"), None),
            ("demo-practitioner", Some("Practitioner/demo-practitioner"), None),
            ("demo-auditor", None, Some("auditor")),
        ] {
            let password = cairn_auth::random_token(12);
            auth.admin(AdminCommand::UserAdd {
                username: username.into(),
                password: password.clone(),
                fhir_user: fhir_user.map(str::to_owned),
                roles: role.into_iter().map(str::to_owned).collect(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("demo user {username}: {e}"))?;
            users.push(json!({"username": username, "password": password, "fhir_user": fhir_user, "role": role}));
        }
        auth.admin(AdminCommand::ClientRegister {
            name: "Demo SMART app".into(),
            kind: ClientKind::Public,
            client_id: Some("demo-app".into()),
            redirect_uris: vec![DEMO_APP_REDIRECT.into()],
            scope: "launch/patient openid fhirUser offline_access online_access patient/*.cruds user/*.rs".into(),
            jwks: None,
            jwks_uri: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("demo app: {e}"))?;
        let device = auth
            .admin(AdminCommand::ClientRegister {
                name: "Demo glucose gateway".into(),
                kind: ClientKind::ConfidentialSymmetric,
                client_id: Some("demo-device".into()),
                redirect_uris: vec![],
                scope: "system/Observation.crus system/Device.crus system/Patient.rs".into(),
                jwks: None,
                jwks_uri: None,
            })
            .await
            .map_err(|e| anyhow::anyhow!("demo device client: {e}"))?;
        let patient = json!({"resourceType": "Patient", "id": "demo-patient", "active": true,
            "name": [{"family": "Demo", "given": ["Pat"]}], "birthDate": "1980-04-02"});
        let ctx = RequestContext {
            actor: Default::default(),
            request_id: "demo-seed".into(),
            access: Access::Unrestricted,
            provenance: None,
        };
        fhir.update(&ctx, "Patient", "demo-patient", patient.to_string().as_bytes(), None)
            .await
            .map_err(|e| anyhow::anyhow!("demo patient: {:?}", e.issues))?;
        let credentials = json!({
            "users": users,
            "smart_app": {"client_id": "demo-app", "redirect_uri": DEMO_APP_REDIRECT},
            "device_client": {"client_id": "demo-device", "client_secret": device["client_secret"]},
        });
        write_private(&file, &serde_json::to_vec_pretty(&credentials)?)?;
        credentials
    };
    let mut text = format!("\ncairn: demo accounts (also in {}):\n", file.display());
    for u in credentials["users"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "  user {:<18} password {}\n",
            u["username"].as_str().unwrap_or(""),
            u["password"].as_str().unwrap_or("")
        ));
    }
    let secret = credentials["device_client"]["client_secret"].as_str().unwrap_or("");
    text.push_str(&format!(
        "  SMART app: client_id demo-app (public, PKCE), redirect_uri {DEMO_APP_REDIRECT}\n  \
         device gateway: client_id demo-device, secret {secret}\n  \
         try: curl -s -u demo-device:{secret} -d grant_type=client_credentials -d scope=system/Observation.crus {public_url}/token\n"
    ));
    println!("{text}");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
