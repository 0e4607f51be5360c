//! `cairn admin`: users, clients and revocations, while the server runs or while it is stopped.
//!
//! A running `cairn serve` listens on a Unix socket in its data directory (`run/admin.sock`, mode
//! 0600: whoever may read the data directory's owner files may administer). The CLI sends one JSON
//! command per connection and prints the answer. With no server running, the CLI opens the log
//! itself, rebuilds the authorization state from it, and appends the same events. Either way the
//! result is an event in the log, and the logic is `cairn_auth::AuthServer::admin`.

use crate::backends;
use crate::config;
use crate::datadir::DataDir;
use crate::{AdminArgs, AdminCommand as Cli, ClientCommand, CommonArgs, IdpCommand, UserCommand};
use anyhow::{Context, bail};
use cairn_auth::{AdminCommand, AuthServer, AuthSettings};
use cairn_events::ClientKind;
use cairn_log::embedded::EmbeddedOptions;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The socket a running server answers admin commands on.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("admin.sock")
}

/// The longest command line read from the socket.
const MAX_COMMAND_BYTES: usize = 1 << 20;

pub fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let (common, command) = to_command(args.command)?;
    let data_dir = config::data_dir(&common)?;
    let answer = match send_to_server(&socket_path(&data_dir), &command)? {
        Some(answer) => answer,
        None => run_offline(&common, &data_dir, command)?,
    };
    let answer = answer.map_err(|e| anyhow::anyhow!(e))?;
    if answer.get("client_secret").is_some() || answer.get("registration_token").is_some() {
        eprintln!("cairn: store the secret now: it is not kept and cannot be shown again");
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(ExitCode::SUCCESS)
}

fn kind(k: crate::ClientKindArg) -> ClientKind {
    match k {
        crate::ClientKindArg::Public => ClientKind::Public,
        crate::ClientKindArg::ConfidentialSymmetric => ClientKind::ConfidentialSymmetric,
        crate::ClientKindArg::ConfidentialAsymmetric => ClientKind::ConfidentialAsymmetric,
    }
}

fn to_command(cli: Cli) -> anyhow::Result<(CommonArgs, AdminCommand)> {
    Ok(match cli {
        Cli::Client(ClientCommand::Register(a)) => {
            let jwks = match &a.jwks_file {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(path).with_context(|| format!("--jwks-file {}", path.display()))?;
                    let v: Value = serde_json::from_str(&text)
                        .with_context(|| format!("--jwks-file {}: not JSON", path.display()))?;
                    Some(v)
                }
                None => None,
            };
            (
                a.common,
                AdminCommand::ClientRegister {
                    name: a.name,
                    kind: kind(a.kind),
                    client_id: a.client_id,
                    redirect_uris: a.redirect_uri,
                    scope: a.scope,
                    jwks,
                    jwks_uri: a.jwks_uri,
                },
            )
        }
        Cli::Client(ClientCommand::Disable(a)) => (a.common, AdminCommand::ClientDisable { client_id: a.client_id }),
        Cli::Client(ClientCommand::List(a)) => (a.common, AdminCommand::ClientList),
        Cli::User(UserCommand::Add(a)) => {
            if !a.password_stdin {
                bail!(
                    "give the password on standard input with --password-stdin (never as an argument: it would show in the process list)"
                );
            }
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password).context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            (a.common, AdminCommand::UserAdd { username: a.username, password, fhir_user: a.fhir_user, roles: a.role })
        }
        Cli::User(UserCommand::Disable(a)) => (a.common, AdminCommand::UserDisable { username: a.username }),
        Cli::User(UserCommand::List(a)) => (a.common, AdminCommand::UserList),
        Cli::User(UserCommand::Link(a)) => {
            (a.common, AdminCommand::UserLink { username: a.username, idp_id: a.idp, subject: a.subject })
        }
        Cli::Idp(IdpCommand::Add(a)) => {
            // Paths as the operator typed them, relative to where they typed them.
            let absolute = |p: Option<String>| -> anyhow::Result<Option<String>> {
                p.map(|p| std::path::absolute(&p).map(|a| a.display().to_string()).with_context(|| p.clone()))
                    .transpose()
            };
            if !a.no_check {
                // A provider that cannot be discovered (wrong issuer, a trailing '/' too many,
                // plain http) would only fail later, at every user's sign-in.
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let checked = runtime
                    .block_on(cairn_federation::Federation::new("http://unused.invalid").check_provider(&a.issuer));
                if let Err(e) = checked {
                    bail!("{e} (--no-check records it anyway)");
                }
            }
            let config = cairn_auth::federation::IdpConfig {
                idp_id: a.id,
                display_name: a.name,
                issuer: a.issuer,
                client_id: a.client_id,
                client_auth_method: a.client_auth_method,
                client_secret_file: absolute(a.client_secret_file)?,
                private_key_file: absolute(a.private_key_file)?,
                scopes: a.scope,
                userinfo: a.userinfo,
                provision_role: a.provision_role,
            };
            (a.common, AdminCommand::IdpAdd(config))
        }
        Cli::Idp(IdpCommand::Disable(a)) => (a.common, AdminCommand::IdpDisable { idp_id: a.id }),
        Cli::Idp(IdpCommand::List(a)) => (a.common, AdminCommand::IdpList),
        Cli::Revoke(a) => (a.common, AdminCommand::Revoke { username: a.user, client_id: a.client, jti: a.jti }),
        Cli::Keys(crate::KeysCommand::Rotate(a)) => (a.common, AdminCommand::KeysRotate),
        Cli::RegistrationToken(a) => (a.common, AdminCommand::RegistrationToken { expires_in_secs: a.expires_in_secs }),
    })
}

/// A request on the admin socket that is not an authorization-server command: a compliance report,
/// run by the FHIR service as `admin` and recorded in the trail like the API's `AuditEvent/$report`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct AuditReportRequest {
    pub kind: String,
    pub patient: Option<String>,
    pub user: Option<String>,
    pub from: String,
    pub to: String,
    /// `json` or `csv`
    pub format: String,
}

/// The kinds of socket request, told apart by shape: `{"audit_report": {...}}`, `{"log": {...}}`
/// (`crate::remotelog`) or an `AdminCommand`.
#[derive(serde::Deserialize)]
struct ReportEnvelope {
    audit_report: AuditReportRequest,
}

#[derive(serde::Deserialize)]
struct LogEnvelope {
    log: crate::remotelog::LogRequest,
}

/// Sends a request to the running server's admin socket. `None` when no server listens there.
pub fn send_to_server(socket: &Path, command: &impl serde::Serialize) -> anyhow::Result<Option<Result<Value, String>>> {
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("admin socket {}", socket.display())),
    };
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(command)?;
    line.push(b'\n');
    stream.write_all(&line).with_context(|| format!("admin socket {}", socket.display()))?;
    let mut reply = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut reply)
        .with_context(|| format!("admin socket {}", socket.display()))?;
    Ok(Some(parse_reply(&reply)?))
}

fn parse_reply(reply: &str) -> anyhow::Result<Result<Value, String>> {
    let v: Value = serde_json::from_str(reply).context("the server's admin answer is not JSON")?;
    Ok(match (v.get("ok"), v.get("error").and_then(Value::as_str)) {
        (Some(ok), _) => Ok(ok.clone()),
        (None, Some(e)) => Err(e.to_owned()),
        _ => bail!("the server's admin answer has neither ok nor error"),
    })
}

/// No server is running: open the log here and run the command against it.
fn run_offline(common: &CommonArgs, data_dir: &Path, command: AdminCommand) -> anyhow::Result<Result<Value, String>> {
    let backends = config::backends(common)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let data = DataDir::open_or_create(data_dir)?;
        let open = backends::open_log(&backends, &data, EmbeddedOptions::default()).await.map_err(|e| {
            if e.to_string().contains("locked") || e.to_string().contains("held by") {
                anyhow::anyhow!(
                    "{e}: a server holds this data directory but does not answer on {}; is it still starting?",
                    socket_path(data_dir).display()
                )
            } else {
                e
            }
        })?;
        let log = open.as_dyn();
        for topic in cairn_events::topics::ALL {
            if log.partitions(topic).is_err() {
                log.create_topic(topic, config::DEFAULT_PARTITIONS).await?;
            }
        }
        // Administrative only: no signing keys, nothing published but the command's own events.
        let auth = AuthServer::start(log, None, AuthSettings::new("http://admin.invalid")).await?;
        let answer = auth.admin(command).await.map_err(|e| e.to_string());
        open.close();
        Ok(answer)
    })
}

/// Serves admin commands on the socket for as long as the server runs. `None` if another server
/// (sharing this data directory, which only a shared Kafka log allows) already answers there: it
/// administers the same log, so one socket is enough.
pub async fn serve_socket(
    path: PathBuf,
    auth: Arc<AuthServer>,
    fhir: Arc<cairn_service::FhirService>,
    log: Arc<dyn cairn_log::EventLog>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let dir = path.parent().expect("socket path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    set_mode(dir, 0o700)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            tracing::warn!(socket = %path.display(), "another cairn server answers admin commands for this data directory");
            return Ok(None);
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    set_mode(&path, 0o600)?;
    Ok(Some(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (auth, fhir, log) = (auth.clone(), fhir.clone(), log.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read).take(MAX_COMMAND_BYTES as u64);
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = if let Ok(LogEnvelope { log: request }) = serde_json::from_str(&line) {
                    match crate::remotelog::answer(&log, &auth.settings().issuer, request).await {
                        Ok(v) => serde_json::json!({"ok": v}),
                        Err(e) => serde_json::json!({"error": e}),
                    }
                } else if let Ok(ReportEnvelope { audit_report }) = serde_json::from_str(&line) {
                    match audit_report_for_admin(&fhir, audit_report).await {
                        Ok(v) => serde_json::json!({"ok": v}),
                        Err(e) => serde_json::json!({"error": e}),
                    }
                } else {
                    match serde_json::from_str::<AdminCommand>(&line) {
                        Ok(cmd) => match auth.admin(cmd).await {
                            Ok(v) => serde_json::json!({"ok": v}),
                            Err(e) => serde_json::json!({"error": e.to_string()}),
                        },
                        Err(e) => serde_json::json!({"error": format!("malformed admin command: {e}")}),
                    }
                };
                let mut bytes = serde_json::to_vec(&answer).expect("JSON");
                bytes.push(b'\n');
                let _ = write.write_all(&bytes).await;
            });
        }
    })))
}

/// Runs a report for whoever may use the socket (the data directory's owner), as the actor `admin`
/// with unrestricted access; the report is audited like one made through the API.
async fn audit_report_for_admin(fhir: &cairn_service::FhirService, r: AuditReportRequest) -> Result<Value, String> {
    let failed =
        |e: cairn_service::FhirError| e.issues.iter().map(|i| i.diagnostics.clone()).collect::<Vec<_>>().join("; ");
    let kind = cairn_service::ReportKind::parse(&r.kind, r.patient.as_deref(), r.user.as_deref()).map_err(failed)?;
    let ctx = cairn_service::RequestContext {
        actor: cairn_events::Actor {
            subject: Some("admin".into()),
            user_agent: Some("cairn audit report".into()),
            ..Default::default()
        },
        request_id: uuid::Uuid::new_v4().to_string(),
        access: cairn_service::Access::Unrestricted,
        provenance: None,
    };
    let report = fhir.audit_report(&ctx, &kind, &r.from, &r.to).await.map_err(failed)?;
    Ok(if r.format == "csv" { Value::String(report.to_csv()) } else { serde_json::to_value(&report).expect("JSON") })
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
