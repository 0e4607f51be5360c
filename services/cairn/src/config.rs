//! Settings resolution: flag, then `CAIRN_*` environment variable (both handled by clap), then the
//! optional TOML file, then the built-in default.

use crate::{CommonArgs, ServeArgs};
use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "./cairn-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_PARTITIONS: u32 = 8;
pub const DEFAULT_SEGMENT_BYTES: u64 = 256 << 20;
pub const DEFAULT_MAX_RESOURCE_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_BUNDLE_BYTES: usize = 32 << 20;
pub const DEFAULT_STORE_CACHE_MB: usize = 256;
pub const DEFAULT_READ_WAIT_MS: u64 = 5000;

/// The keys a `--config` file may hold. Unknown keys are an error, so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    public_url: Option<String>,
    partitions: Option<u32>,
    segment_bytes: Option<u64>,
    max_resource_bytes: Option<usize>,
    max_bundle_bytes: Option<usize>,
    read_wait_ms: Option<u64>,
    store_cache_mb: Option<usize>,
    log: Option<String>,
    kafka_brokers: Option<String>,
    kafka_topic_prefix: Option<String>,
    kafka_replication_factor: Option<i32>,
    kafka_min_insync_replicas: Option<i32>,
    kafka_transactional_id: Option<String>,
    store: Option<String>,
    scylla_nodes: Option<String>,
    scylla_keyspace: Option<String>,
    scylla_replication_factor: Option<u32>,
    roles: Option<String>,
    seal_key_file: Option<PathBuf>,
    token_key_dir: Option<PathBuf>,
    backend_token_lifetime_secs: Option<u64>,
    access_token_lifetime_secs: Option<u64>,
    offline_refresh_lifetime_secs: Option<u64>,
    revocation_lag_bound_ms: Option<u64>,
    password_login: Option<bool>,
    /// Upstream OpenID providers (`[[idp]]` tables), recorded in the log at start when they change.
    #[serde(default)]
    idp: Vec<cairn_auth::federation::IdpConfig>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub public_url: String,
    /// Whether the public URL was given; if not it follows the bound address (which matters with
    /// port 0), since it is also the token issuer.
    pub public_url_explicit: bool,
    pub partitions: u32,
    pub segment_bytes: u64,
    pub max_resource_bytes: usize,
    pub max_bundle_bytes: usize,
    pub read_wait: std::time::Duration,
    pub store_cache_bytes: usize,
    pub insecure_no_auth: bool,
    pub demo: bool,
    pub backends: Backends,
    pub roles: Roles,
    pub seal_key_file: PathBuf,
    /// Where this process keeps its token-signing keys.
    pub token_key_dir: PathBuf,
    pub backend_token_lifetime: std::time::Duration,
    pub access_token_lifetime: std::time::Duration,
    pub offline_refresh_lifetime: std::time::Duration,
    pub revocation_lag_bound: std::time::Duration,
    /// Whether users may sign in with a Cairn password.
    pub password_login: bool,
    /// Upstream OpenID providers from the config file (credential paths made absolute, relative to
    /// the file).
    pub idps: Vec<cairn_auth::federation::IdpConfig>,
    /// `--read-only --store-dir DIR`: serve a replayed store (`viewer.rs`).
    pub view_of: Option<PathBuf>,
    pub token_issuer: Option<String>,
}

/// What one `cairn serve` process does. Default: everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The FHIR API.
    pub fhir: bool,
    /// The resource projector (log -> store).
    pub projector: bool,
}

impl Roles {
    pub const ALL: Roles = Roles { fhir: true, projector: true };

    pub fn parse(text: &str) -> anyhow::Result<Roles> {
        let mut roles = Roles { fhir: false, projector: false };
        for role in text.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            match role {
                "fhir" => roles.fhir = true,
                "projector" => roles.projector = true,
                other => bail!("--roles: unknown role `{other}` (use fhir, projector)"),
            }
        }
        if !roles.fhir && !roles.projector {
            bail!("--roles `{text}`: name at least one role (fhir, projector)");
        }
        Ok(roles)
    }
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [("fhir", self.fhir), ("projector", self.projector)]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Which event log and projection store to use, with their settings.
#[derive(Debug, Clone)]
pub struct Backends {
    pub log: LogBackend,
    pub store: StoreBackend,
}

#[derive(Debug, Clone)]
pub enum LogBackend {
    Embedded,
    Kafka(cairn_log_kafka::KafkaSettings),
}

#[derive(Debug, Clone)]
pub enum StoreBackend {
    Embedded,
    Scylla(cairn_store_scylla::ScyllaSettings),
}

pub const DEFAULT_SCYLLA_KEYSPACE: &str = "cairn";

/// The backends for any command: flag, environment, file, default (embedded).
pub fn backends(common: &CommonArgs) -> anyhow::Result<Backends> {
    let file = read_file(common.config.as_deref())?;
    resolve_backends(common, &file)
}

fn resolve_backends(common: &CommonArgs, file: &FileSettings) -> anyhow::Result<Backends> {
    let a = &common.backends;
    let log = match a.log.clone().or(file.log.clone()).as_deref().unwrap_or("embedded") {
        "embedded" => LogBackend::Embedded,
        "kafka" => {
            let Some(brokers) = a.kafka_brokers.clone().or(file.kafka_brokers.clone()) else {
                bail!(
                    "--log kafka needs --kafka-brokers (or CAIRN_KAFKA_BROKERS, or kafka_brokers in the config file)"
                );
            };
            let mut k = cairn_log_kafka::KafkaSettings::new(brokers);
            k.topic_prefix = a.kafka_topic_prefix.clone().or(file.kafka_topic_prefix.clone()).unwrap_or_default();
            k.replication_factor = a.kafka_replication_factor.or(file.kafka_replication_factor).unwrap_or(1);
            k.min_insync_replicas = a.kafka_min_insync_replicas.or(file.kafka_min_insync_replicas).unwrap_or(1);
            if let Some(id) = a.kafka_transactional_id.clone().or(file.kafka_transactional_id.clone()) {
                if id.is_empty() || id.len() > 200 {
                    bail!("--kafka-transactional-id: 1 to 200 characters, one per process instance");
                }
                k.transactional_id = id;
            }
            if k.replication_factor < 1 || k.min_insync_replicas < 1 || k.min_insync_replicas > k.replication_factor {
                bail!(
                    "Kafka replication factor {} and min.insync.replicas {}: need 1 <= min.insync.replicas <= replication factor",
                    k.replication_factor,
                    k.min_insync_replicas
                );
            }
            LogBackend::Kafka(k)
        }
        other => bail!("--log `{other}`: use embedded or kafka"),
    };
    let store = match a.store.clone().or(file.store.clone()).as_deref().unwrap_or("embedded") {
        "embedded" => StoreBackend::Embedded,
        "scylla" => {
            let Some(nodes) = a.scylla_nodes.clone().or(file.scylla_nodes.clone()) else {
                bail!(
                    "--store scylla needs --scylla-nodes (or CAIRN_SCYLLA_NODES, or scylla_nodes in the config file)"
                );
            };
            let keyspace = a
                .scylla_keyspace
                .clone()
                .or(file.scylla_keyspace.clone())
                .unwrap_or_else(|| DEFAULT_SCYLLA_KEYSPACE.to_owned());
            let mut sc = cairn_store_scylla::ScyllaSettings::new(nodes, keyspace);
            sc.replication_factor = a.scylla_replication_factor.or(file.scylla_replication_factor).unwrap_or(1);
            StoreBackend::Scylla(sc)
        }
        other => bail!("--store `{other}`: use embedded or scylla"),
    };
    // A shared store records how far each log partition is projected: it must belong to exactly one
    // log, and every process on that log must see the same store.
    match (&log, &store) {
        (LogBackend::Kafka(_), StoreBackend::Embedded) => bail!(
            "--log kafka needs --store scylla: projector processes share Kafka's partitions, so they need one shared store"
        ),
        (LogBackend::Embedded, StoreBackend::Scylla(_)) => {
            bail!("--store scylla needs --log kafka: a shared store's checkpoints must refer to one shared log")
        }
        _ => {}
    }
    Ok(Backends { log, store })
}

fn read_file(path: Option<&Path>) -> anyhow::Result<FileSettings> {
    let Some(path) = path else { return Ok(FileSettings::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let message = e.message().to_owned();
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        match line {
            Some(line) => anyhow::anyhow!("config file {} line {line}: {message}", path.display()),
            None => anyhow::anyhow!("config file {}: {message}", path.display()),
        }
    })
}

/// The data directory for commands that take only the common settings.
pub fn data_dir(common: &CommonArgs) -> anyhow::Result<PathBuf> {
    let file = read_file(common.config.as_deref())?;
    Ok(common.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)))
}

pub fn resolve_serve(args: &ServeArgs) -> anyhow::Result<Settings> {
    let file = read_file(args.common.config.as_deref())?;
    let backends = resolve_backends(&args.common, &file)?;
    let data_dir = args.common.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let listen_text = args.listen.clone().or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen: SocketAddr = listen_text
        .parse()
        .with_context(|| format!("--listen `{listen_text}` is not an address like 127.0.0.1:8080"))?;
    let public_url_explicit = args.public_url.is_some() || file.public_url.is_some();
    let public_url = args.public_url.clone().or(file.public_url).unwrap_or_else(|| format!("http://{listen}"));
    let public_url = public_url.trim_end_matches('/').to_owned();
    if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
        bail!("--public-url `{public_url}` must start with http:// or https://");
    }
    let partitions = args.partitions.or(file.partitions).unwrap_or(DEFAULT_PARTITIONS);
    if !(1..=1024).contains(&partitions) {
        bail!("--partitions {partitions} is out of range (1 to 1024)");
    }
    let segment_bytes = file.segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES);
    if segment_bytes < 1 << 20 {
        bail!("segment_bytes {segment_bytes} is below the 1 MiB minimum");
    }
    let max_resource_bytes = args.max_resource_bytes.or(file.max_resource_bytes).unwrap_or(DEFAULT_MAX_RESOURCE_BYTES);
    if max_resource_bytes < 1024 {
        bail!("--max-resource-bytes {max_resource_bytes} is below the 1024-byte minimum");
    }
    let max_bundle_bytes = args.max_bundle_bytes.or(file.max_bundle_bytes).unwrap_or(DEFAULT_MAX_BUNDLE_BYTES);
    let read_wait =
        std::time::Duration::from_millis(args.read_wait_ms.or(file.read_wait_ms).unwrap_or(DEFAULT_READ_WAIT_MS));
    let store_cache_mb = args.store_cache_mb.or(file.store_cache_mb).unwrap_or(DEFAULT_STORE_CACHE_MB);
    if !(16..=1 << 20).contains(&store_cache_mb) {
        bail!("--store-cache-mb {store_cache_mb} is out of range (16 to 1048576)");
    }
    let roles = match args.roles.clone().or(file.roles.clone()) {
        Some(text) => Roles::parse(&text)?,
        None => Roles::ALL,
    };
    if !roles.projector && matches!(backends.store, StoreBackend::Embedded) {
        bail!("--roles {roles}: a process without the projector role needs a shared store (--store scylla)");
    }
    if args.insecure_no_auth && !listen.ip().is_loopback() {
        bail!("--insecure-no-auth refuses to serve on {listen}: unauthenticated access is for a loopback address only");
    }
    let seal_key_file = args
        .seal_key_file
        .clone()
        .or(file.seal_key_file.clone())
        .unwrap_or_else(|| data_dir.join("keys").join("seal-ed25519.key"));
    let token_key_dir = args
        .token_key_dir
        .clone()
        .or(file.token_key_dir.clone())
        .unwrap_or_else(|| data_dir.join("keys").join("tokens"));
    let backend_token_lifetime_secs =
        args.backend_token_lifetime_secs.or(file.backend_token_lifetime_secs).unwrap_or(300);
    if !(10..=300).contains(&backend_token_lifetime_secs) {
        bail!(
            "--backend-token-lifetime-secs {backend_token_lifetime_secs}: SMART Backend Services tokens live 10 to 300 seconds"
        );
    }
    let access_token_lifetime_secs = args.access_token_lifetime_secs.or(file.access_token_lifetime_secs).unwrap_or(900);
    if !(60..=3600).contains(&access_token_lifetime_secs) {
        bail!("--access-token-lifetime-secs {access_token_lifetime_secs}: app access tokens live 60 to 3600 seconds");
    }
    let offline_refresh_lifetime_secs =
        args.offline_refresh_lifetime_secs.or(file.offline_refresh_lifetime_secs).unwrap_or(30 * 24 * 3600);
    if !(3600..=365 * 24 * 3600).contains(&offline_refresh_lifetime_secs) {
        bail!("--offline-refresh-lifetime-secs {offline_refresh_lifetime_secs}: 1 hour to 1 year");
    }
    let revocation_lag_bound_ms = args.revocation_lag_bound_ms.or(file.revocation_lag_bound_ms).unwrap_or(5000);
    if !(200..=600_000).contains(&revocation_lag_bound_ms) {
        bail!("--revocation-lag-bound-ms {revocation_lag_bound_ms}: 200 ms to 10 minutes");
    }
    let password_login = !args.no_password_login && file.password_login.unwrap_or(true);
    let config_dir = args.common.config.as_deref().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let idps = file
        .idp
        .iter()
        .map(|i| {
            let near_file = |p: &Option<String>| p.as_ref().map(|p| config_dir.join(p).display().to_string());
            cairn_auth::federation::IdpConfig {
                client_secret_file: near_file(&i.client_secret_file),
                private_key_file: near_file(&i.private_key_file),
                ..i.clone()
            }
        })
        .collect();
    if let Some(issuer) = &args.token_issuer
        && !(issuer.starts_with("http://") || issuer.starts_with("https://"))
    {
        bail!("--token-issuer `{issuer}` must start with http:// or https://");
    }
    Ok(Settings {
        view_of: args.store_dir.clone().filter(|_| args.read_only),
        token_issuer: args.token_issuer.clone().map(|i| i.trim_end_matches('/').to_owned()),
        password_login,
        idps,
        revocation_lag_bound: std::time::Duration::from_millis(revocation_lag_bound_ms),
        access_token_lifetime: std::time::Duration::from_secs(access_token_lifetime_secs),
        offline_refresh_lifetime: std::time::Duration::from_secs(offline_refresh_lifetime_secs),
        data_dir,
        listen,
        public_url,
        public_url_explicit,
        token_key_dir,
        backend_token_lifetime: std::time::Duration::from_secs(backend_token_lifetime_secs),
        partitions,
        segment_bytes,
        max_resource_bytes,
        max_bundle_bytes,
        read_wait,
        store_cache_bytes: store_cache_mb << 20,
        insecure_no_auth: args.insecure_no_auth,
        demo: args.demo,
        backends,
        roles,
        seal_key_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(config: Option<PathBuf>, listen: Option<&str>) -> ServeArgs {
        ServeArgs {
            common: CommonArgs { data_dir: None, config, ..Default::default() },
            listen: listen.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cairn.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9999\"\ndata_dir = \"/srv/cairn\"\npartitions = 4\n").unwrap();
        let s = resolve_serve(&serve_args(Some(file.clone()), None)).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(s.data_dir, PathBuf::from("/srv/cairn"));
        assert_eq!(s.partitions, 4);
        assert_eq!(s.public_url, "http://127.0.0.1:9999");
        let s = resolve_serve(&serve_args(Some(file), Some("127.0.0.1:7000"))).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:7000");
        let s = resolve_serve(&serve_args(None, None)).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn bad_files_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cairn.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n").unwrap();
        let err = resolve_serve(&serve_args(Some(file.clone()), None)).unwrap_err().to_string();
        assert!(err.contains("cairn.toml line 2") && err.contains("lisen"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        let err = resolve_serve(&serve_args(None, Some("localhost"))).unwrap_err().to_string();
        assert!(err.contains("--listen `localhost`"), "{err}");
    }

    #[test]
    fn roles_parse_and_explain_what_is_wrong() {
        assert_eq!(Roles::parse("fhir,projector").unwrap(), Roles::ALL);
        assert_eq!(Roles::parse(" projector ").unwrap(), Roles { fhir: false, projector: true });
        assert!(Roles::parse("fhir,sorcery").unwrap_err().to_string().contains("unknown role `sorcery`"));
        assert!(Roles::parse("").is_err());
        let args = ServeArgs { roles: Some("fhir".into()), ..Default::default() };
        let err = resolve_serve(&args).unwrap_err().to_string();
        assert!(err.contains("shared store"), "{err}");
    }

    #[test]
    fn backends_default_to_embedded_and_need_their_addresses() {
        let s = resolve_serve(&serve_args(None, None)).unwrap();
        assert!(matches!(s.backends.log, LogBackend::Embedded));
        assert!(matches!(s.backends.store, StoreBackend::Embedded));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cairn.toml");
        std::fs::write(&file, "log = \"kafka\"\nstore = \"scylla\"\n").unwrap();
        let err = resolve_serve(&serve_args(Some(file.clone()), None)).unwrap_err().to_string();
        assert!(err.contains("--kafka-brokers"), "{err}");
        std::fs::write(
            &file,
            "log = \"kafka\"\nkafka_brokers = \"k:9092\"\nkafka_topic_prefix = \"t.\"\nstore = \"scylla\"\nscylla_nodes = \"s:9042\"\n",
        )
        .unwrap();
        let s = resolve_serve(&serve_args(Some(file.clone()), None)).unwrap();
        match (&s.backends.log, &s.backends.store) {
            (LogBackend::Kafka(k), StoreBackend::Scylla(sc)) => {
                assert_eq!((k.brokers.as_str(), k.topic_prefix.as_str(), k.replication_factor), ("k:9092", "t.", 1));
                assert_eq!((sc.nodes.as_str(), sc.keyspace.as_str()), ("s:9042", DEFAULT_SCYLLA_KEYSPACE));
            }
            other => panic!("{other:?}"),
        }
        // Mixed backends are refused: a shared store's checkpoints belong to one shared log.
        std::fs::write(&file, "log = \"kafka\"\nkafka_brokers = \"k:9092\"\n").unwrap();
        let err = resolve_serve(&serve_args(Some(file.clone()), None)).unwrap_err().to_string();
        assert!(err.contains("--log kafka needs --store scylla"), "{err}");
        std::fs::write(&file, "store = \"scylla\"\nscylla_nodes = \"s:9042\"\n").unwrap();
        let err = resolve_serve(&serve_args(Some(file), None)).unwrap_err().to_string();
        assert!(err.contains("--store scylla needs --log kafka"), "{err}");
    }
}
