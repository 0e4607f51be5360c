//! `cairn`: the command line. Every subcommand is a thin shell over a plain function; errors become
//! one readable line on stderr and a non-zero exit.

/// mimalloc instead of glibc's allocator: see docs/decisions/0010-projection-store-layout.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod auditcmd;
mod backends;
mod bench;
mod config;
mod datadir;
mod demo;
mod investigatecmd;
mod jwks;
mod keys;
mod logcmd;
mod remotelog;
mod replaycmd;
mod serve;
mod storecmd;
mod telemetry;
mod viewer;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "cairn", version, about = "Cairn: an event-sourced, audit-first FHIR R4 platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole platform in one process (embedded log and store by default).
    Serve(ServeArgs),
    /// Inspect and verify the event log.
    #[command(subcommand)]
    Log(LogCommand),
    /// The audit trail's evidence: verify the log against its signed seals, export one patient's
    /// audit slice with its proof, verify a slice on another machine.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Rebuild the projections (resources with their history and indexes, AuditEvent, Provenance) as
    /// they stood at a past moment, from the log into a separate store; the live system keeps serving.
    Replay(ReplayArgs),
    /// Questions investigators ask of the log.
    #[command(subcommand)]
    Investigate(InvestigateCommand),
    /// Load generator for any FHIR server: creates, batch Bundles or searches; prints throughput and latency.
    Bench(BenchArgs),
    /// Inspect the projection store (derived from the log; safe to delete while stopped).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Create or upgrade the CQL schema (with --store scylla): keyspace and tables, idempotent.
    Migrate(StoreArgs),
    /// Users, OAuth clients and revocations. Works while the server runs (through its admin socket)
    /// and while it is stopped (directly on the log). Every change is an event.
    Admin(AdminArgs),
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check every partition's hash chain and every seal's signature, and report the first tampered
    /// position (exit status 2); with --export, check an audit slice instead (no data directory needed).
    Verify(AuditVerifyArgs),
    /// Write the AuditEvents and Provenances about one patient recorded in a time window, with the
    /// proof (the events, their neighbours' digests, the signed seals) that `cairn audit verify
    /// --export` checks offline. Reads the log only; safe beside a running server.
    Export(AuditExportArgs),
    /// A compliance report over the audit trail (the API's AuditEvent/$report), as JSON or CSV. Runs in
    /// the running server (through its admin socket), which records the report in the trail as an
    /// access by `admin`.
    Report(AuditReportArgs),
}

#[derive(Args, Debug)]
pub struct AuditReportArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Which report
    #[arg(long, value_parser = ["patient-access", "user-activity", "failed-logins", "security-alerts"])]
    pub kind: String,
    /// The patient (an id or Patient/<id>), for patient-access: every access to the patient's data
    #[arg(long)]
    pub patient: Option<String>,
    /// The Cairn user id, for user-activity: everything the user did
    #[arg(long)]
    pub user: Option<String>,
    /// Start of the window: a FHIR date or instant (2026-11-01, 2026-11-01T08:00:00Z), included
    #[arg(long)]
    pub from: String,
    /// End of the window, included
    #[arg(long)]
    pub to: String,
    /// Output format
    #[arg(long, default_value = "json", value_parser = ["json", "csv"])]
    pub format: String,
}

#[derive(Subcommand, Debug)]
pub enum InvestigateCommand {
    /// Everything that touched one patient in a window, oldest first: each access to the patient's
    /// data (reads, searches, writes with the version before and after, refusals) with who, through
    /// which app and token, from where, and the token grants and sign-ins behind them. Reads the log
    /// only; safe beside a running server.
    Timeline(TimelineArgs),
    /// What exactly a user (or a client acting for itself) saw in a window: each of their reads and
    /// searches with the resource versions it returned, the content of each version reproduced from
    /// the log. Reads the log only; safe beside a running server.
    Seen(SeenArgs),
}

#[derive(Args, Debug)]
#[group(id = "viewer", required = true, multiple = false, args = ["user", "client"])]
pub struct SeenArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The Cairn user id (the subject of their tokens; `cairn admin user list` shows it)
    #[arg(long)]
    pub user: Option<String>,
    /// A client id, for a client that acts for itself (SMART Backend Services)
    #[arg(long)]
    pub client: Option<String>,
    #[command(flatten)]
    pub window: WindowArgs,
    #[command(flatten)]
    pub output: InvestigationOutputArgs,
}

/// A time window.
#[derive(Args, Debug)]
pub struct WindowArgs {
    /// Start of the window, RFC 3339 (e.g. 2026-11-01T00:00:00Z), included
    #[arg(long)]
    pub from: String,
    /// End of the window, RFC 3339, included
    #[arg(long)]
    pub to: String,
}

/// Where and how an investigation's answer is written.
#[derive(Args, Debug)]
pub struct InvestigationOutputArgs {
    /// Output: JSON lines, CSV, or a self-contained HTML page to open and print
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv", "html"])]
    pub format: String,
    /// Where to write it; standard output when absent
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// One patient and a time window: what audit exports and timelines are about.
#[derive(Args, Debug)]
pub struct PatientWindowArgs {
    /// The patient: an id, or Patient/<id>
    #[arg(long)]
    pub patient: String,
    #[command(flatten)]
    pub window: WindowArgs,
}

#[derive(Args, Debug)]
pub struct TimelineArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub window: PatientWindowArgs,
    #[command(flatten)]
    pub output: InvestigationOutputArgs,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The moment: an RFC 3339 time (every record the log had accepted by then), or
    /// topic:partition:offset (up to and including that record; the other partitions as of its time)
    #[arg(long)]
    pub until: String,
    /// A new or empty directory for the replayed store; replay.json there records the cut, the speed
    /// and the store digest
    #[arg(long, value_name = "DIR")]
    pub into: PathBuf,
    /// Page cache of the store being built, in MiB (16 to 1048576)
    #[arg(long, value_name = "MIB", default_value_t = config::DEFAULT_STORE_CACHE_MB)]
    pub store_cache_mb: usize,
}

#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// An audit slice written by `cairn audit export`: verify it rather than the log
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct AuditExportArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub window: PatientWindowArgs,
    /// Where to write the slice (JSON); standard output when absent
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// How long to wait for the running server to seal the newest records, in seconds
    #[arg(long, default_value_t = 10)]
    pub seal_wait_secs: u64,
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// OAuth clients: apps, device gateways, resource servers.
    #[command(subcommand)]
    Client(ClientCommand),
    /// User accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Upstream OpenID providers users may sign in through.
    #[command(subcommand)]
    Idp(IdpCommand),
    /// Revoke tokens: every token of a user or a client issued until now, or one token by its jti.
    Revoke(RevokeArgs),
    /// Token-signing keys of the running server.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print an RFC 7591 initial access token that lets one party register clients at /register.
    RegistrationToken(RegistrationTokenArgs),
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// New signing keys, published before they sign; the old ones stay published until every token
    /// they signed has expired. Needs the running server (it holds the keys).
    Rotate(StoreArgs),
}

#[derive(Args, Debug)]
pub struct RegistrationTokenArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How long the token may be used, in seconds (60 to 2592000)
    #[arg(long, default_value_t = 3600)]
    pub expires_in_secs: u64,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Register a client; prints its id (and, for a symmetric client, its secret, once).
    Register(ClientRegisterArgs),
    /// Disable a client: no new tokens, and its live tokens stop working.
    Disable(ClientIdArgs),
    /// List the registered clients.
    List(StoreArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum ClientKindArg {
    /// A browser or native app without credentials (PKCE only)
    Public,
    /// Authenticates with a generated secret (client_secret_basic or client_secret_post)
    ConfidentialSymmetric,
    /// Authenticates with a signed JWT (private_key_jwt, SMART Backend Services)
    ConfidentialAsymmetric,
}

#[derive(Args, Debug)]
pub struct ClientRegisterArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// A name people recognise (shown on the consent page)
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum)]
    pub kind: ClientKindArg,
    /// The scopes the client may be granted, space-separated SMART scopes, e.g. "system/Observation.cru"
    #[arg(long)]
    pub scope: String,
    /// Choose the client id instead of a generated one
    #[arg(long)]
    pub client_id: Option<String>,
    /// An exact redirect URI (repeat for several)
    #[arg(long)]
    pub redirect_uri: Vec<String>,
    /// The client's public keys, a JWK Set file (confidential-asymmetric)
    #[arg(long)]
    pub jwks_file: Option<PathBuf>,
    /// Where to fetch the client's public keys (confidential-asymmetric)
    #[arg(long)]
    pub jwks_uri: Option<String>,
}

#[derive(Args, Debug)]
pub struct ClientIdArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long)]
    pub client_id: String,
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user; the password is read from standard input.
    Add(UserAddArgs),
    /// Disable a user: no sign-in, and their live tokens stop working.
    Disable(UsernameArgs),
    /// Let an upstream identity (provider and subject) sign in as this user.
    Link(UserLinkArgs),
    /// List the users.
    List(StoreArgs),
}

#[derive(Args, Debug)]
pub struct UserAddArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long)]
    pub username: String,
    /// Read the password from standard input (one line)
    #[arg(long)]
    pub password_stdin: bool,
    /// The FHIR resource for this user, e.g. Patient/123 or Practitioner/7
    #[arg(long)]
    pub fhir_user: Option<String>,
    /// A role, e.g. auditor (repeat for several)
    #[arg(long)]
    pub role: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum IdpCommand {
    /// Add an upstream OpenID provider (or change one: the same --id again). Register Cairn at the
    /// provider first, with the redirect URI {public-url}/login/idp/{id}/callback.
    Add(IdpAddArgs),
    /// Disable a provider: its button disappears and its sign-ins are refused (links are kept).
    Disable(IdpIdArgs),
    /// List the providers.
    List(StoreArgs),
}

#[derive(Args, Debug)]
pub struct IdpAddArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Short id used in addresses: lowercase letters, digits, '-'
    #[arg(long)]
    pub id: String,
    /// What the sign-in button says, e.g. "Hospital ID"
    #[arg(long)]
    pub name: String,
    /// The provider's issuer URL (https; http only on loopback)
    #[arg(long)]
    pub issuer: String,
    /// Cairn's client id at the provider
    #[arg(long)]
    pub client_id: String,
    /// How Cairn authenticates at the provider's token endpoint
    #[arg(long, default_value = "client_secret_basic", value_parser = ["client_secret_basic", "client_secret_post", "private_key_jwt"])]
    pub client_auth_method: String,
    /// A file (mode 0600) holding the client secret on one line; it is read, never recorded
    #[arg(long, value_name = "FILE")]
    pub client_secret_file: Option<String>,
    /// A PKCS#8 PEM private key (mode 0600, EC P-256 or RSA) for private_key_jwt
    #[arg(long, value_name = "FILE")]
    pub private_key_file: Option<String>,
    /// A scope to ask for besides openid (repeat for several)
    #[arg(long)]
    pub scope: Vec<String>,
    /// Also call the provider's userinfo endpoint (its subject must match the ID token's)
    #[arg(long)]
    pub userinfo: bool,
    /// Just-in-time provisioning: an unknown upstream identity gets a new user with this role
    /// (without it, only identities linked with `cairn admin user link` may sign in)
    #[arg(long)]
    pub provision_role: Option<String>,
    /// Record the provider without first fetching its discovery document (e.g. while it is down)
    #[arg(long)]
    pub no_check: bool,
}

#[derive(Args, Debug)]
pub struct IdpIdArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long)]
    pub id: String,
}

#[derive(Args, Debug)]
pub struct UserLinkArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The Cairn user
    #[arg(long)]
    pub username: String,
    /// The provider's id (cairn admin idp list)
    #[arg(long)]
    pub idp: String,
    /// The user's subject (`sub`) at the provider
    #[arg(long)]
    pub subject: String,
}

#[derive(Args, Debug)]
pub struct UsernameArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(long)]
    pub username: String,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["user", "client", "jti"])))]
pub struct RevokeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Every token of this user (by username)
    #[arg(long)]
    pub user: Option<String>,
    /// Every token of this client
    #[arg(long)]
    pub client: Option<String>,
    /// One token, by its jti
    #[arg(long)]
    pub jti: Option<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// FHIR base URL, e.g. http://127.0.0.1:8080/fhir
    #[arg(long)]
    pub base_url: String,
    /// Bearer token to send
    #[arg(long, env = "CAIRN_BENCH_TOKEN")]
    pub token: Option<String>,
    #[arg(long, value_enum, default_value = "create")]
    pub workload: bench::Workload,
    /// Concurrent connections
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run, in seconds
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Observations per batch Bundle (workload batch)
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Distinct patients the readings are spread over
    #[arg(long, default_value_t = 1000)]
    pub patients: u64,
    /// What writes ask to get back (`Prefer: return=`, workloads create and batch): the stored
    /// resource (representation, what servers send by default), ids and versions only (minimal, what
    /// a gateway needs), or an OperationOutcome. Unset: no Prefer header
    #[arg(long, value_parser = ["representation", "minimal", "OperationOutcome"])]
    pub prefer: Option<String>,
    /// An initial access token (cairn admin registration-token): the grant, grant-secret and
    /// introspect workloads register their own client with it
    #[arg(long, env = "CAIRN_BENCH_REGISTRATION_TOKEN")]
    pub registration_token: Option<String>,
    /// Client assertions to sign before a grant run (one per request)
    #[arg(long, default_value_t = 100_000)]
    pub assertions: usize,
    /// The revocation workload: the FHIR base URL of the instance that must enforce revocations
    /// made at --base-url (another API process behind the same log); defaults to --base-url
    #[arg(long)]
    pub check_url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Print a SHA-256 digest of everything projected (checkpoints excluded), to compare rebuilds.
    Digest(StoreArgs),
}

#[derive(Args, Debug)]
pub struct StoreArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Settings every command shares. Precedence: flag, then `CAIRN_*` environment variable, then the
/// TOML file given with `--config`, then the built-in default.
#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Data directory holding the event log and everything derived from it [default: ./cairn-data]
    #[arg(long, env = "CAIRN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Optional TOML settings file (keys: the long flags with `_` for `-`, e.g. data_dir, listen, public_url, partitions, log, kafka_brokers, store, scylla_nodes, ...)
    #[arg(long, env = "CAIRN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub backends: BackendArgs,
}

/// Where the event log and the projection store live. Defaults: both embedded in the data directory.
#[derive(Args, Debug, Clone, Default)]
pub struct BackendArgs {
    /// Event log backend: embedded (files in the data directory) or kafka [default: embedded]
    #[arg(long, env = "CAIRN_LOG_BACKEND", global = true, value_parser = ["embedded", "kafka"])]
    pub log: Option<String>,
    /// Kafka bootstrap servers, host:port[,host:port...] (with --log kafka)
    #[arg(long, env = "CAIRN_KAFKA_BROKERS", global = true)]
    pub kafka_brokers: Option<String>,
    /// Prefix of every topic and consumer-group name on the Kafka cluster [default: none]
    #[arg(long, env = "CAIRN_KAFKA_TOPIC_PREFIX", global = true)]
    pub kafka_topic_prefix: Option<String>,
    /// Replicas per partition of the topics Cairn creates [default: 1; use 3 in production]
    #[arg(long, env = "CAIRN_KAFKA_REPLICATION_FACTOR", global = true)]
    pub kafka_replication_factor: Option<i32>,
    /// min.insync.replicas of the topics Cairn creates [default: 1; use 2 in production]
    #[arg(long, env = "CAIRN_KAFKA_MIN_INSYNC_REPLICAS", global = true)]
    pub kafka_min_insync_replicas: Option<i32>,
    /// Kafka transactional id of this process: give each instance a stable one, so that a restarted
    /// instance fences its predecessor's open transaction at once instead of readers waiting for it to
    /// time out [default: random per process]
    #[arg(long, env = "CAIRN_KAFKA_TRANSACTIONAL_ID", global = true)]
    pub kafka_transactional_id: Option<String>,
    /// Projection store backend: embedded (redb in the data directory) or scylla (ScyllaDB or Cassandra) [default: embedded]
    #[arg(long, env = "CAIRN_STORE_BACKEND", global = true, value_parser = ["embedded", "scylla"])]
    pub store: Option<String>,
    /// CQL contact points, host:port[,host:port...] (with --store scylla)
    #[arg(long, env = "CAIRN_SCYLLA_NODES", global = true)]
    pub scylla_nodes: Option<String>,
    /// CQL keyspace [default: cairn]
    #[arg(long, env = "CAIRN_SCYLLA_KEYSPACE", global = true)]
    pub scylla_keyspace: Option<String>,
    /// Replication factor of a keyspace `cairn migrate` creates [default: 1; use 3 in production]
    #[arg(long, env = "CAIRN_SCYLLA_REPLICATION_FACTOR", global = true)]
    pub scylla_replication_factor: Option<u32>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<String>,
    /// Public base URL clients use to reach this server [default: http://<listen address>]
    #[arg(long, env = "CAIRN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Partitions per topic when a topic is first created [default: 8]
    #[arg(long, env = "CAIRN_PARTITIONS")]
    pub partitions: Option<u32>,
    /// Largest FHIR resource accepted, in bytes; larger bodies get 413 [default: 1048576]
    #[arg(long, env = "CAIRN_MAX_RESOURCE_BYTES")]
    pub max_resource_bytes: Option<usize>,
    /// Largest batch or transaction Bundle accepted, in bytes [default: 33554432]
    #[arg(long, env = "CAIRN_MAX_BUNDLE_BYTES")]
    pub max_bundle_bytes: Option<usize>,
    /// Page cache of the embedded projection store, in MiB [default: 256]
    #[arg(long, env = "CAIRN_STORE_CACHE_MB")]
    pub store_cache_mb: Option<usize>,
    /// How long a read waits for the store to reach the log before answering 503, in ms [default: 5000]
    #[arg(long, env = "CAIRN_READ_WAIT_MS")]
    pub read_wait_ms: Option<u64>,
    /// The Ed25519 key the log sealer signs seals (signed chain heads) with, created on first start if absent
    /// [default: <data dir>/keys/seal-ed25519.key]
    #[arg(long, env = "CAIRN_SEAL_KEY_FILE")]
    pub seal_key_file: Option<PathBuf>,
    /// What this process does, comma-separated: fhir (the API), projector (log -> store). Several
    /// processes with different roles can share one Kafka and one ScyllaDB [default: fhir,projector]
    #[arg(long, env = "CAIRN_ROLES")]
    pub roles: Option<String>,
    /// Directory of this process's token-signing keys (created on first start, owner-only)
    /// [default: <data dir>/keys/tokens]
    #[arg(long, env = "CAIRN_TOKEN_KEY_DIR")]
    pub token_key_dir: Option<PathBuf>,
    /// Lifetime of access tokens issued to backend services (client_credentials), 10 to 300 seconds
    /// [default: 300]
    #[arg(long, env = "CAIRN_BACKEND_TOKEN_LIFETIME_SECS")]
    pub backend_token_lifetime_secs: Option<u64>,
    /// Lifetime of access (and ID) tokens issued to apps, 60 to 3600 seconds [default: 900]
    #[arg(long, env = "CAIRN_ACCESS_TOKEN_LIFETIME_SECS")]
    pub access_token_lifetime_secs: Option<u64>,
    /// Lifetime of refresh tokens granted with offline_access, in seconds (1 hour to 1 year)
    /// [default: 2592000, 30 days]
    #[arg(long, env = "CAIRN_OFFLINE_REFRESH_LIFETIME_SECS")]
    pub offline_refresh_lifetime_secs: Option<u64>,
    /// How far this process's view of revocations may lag behind the log before it refuses bearer
    /// tokens with 503 (and /readyz says so), in ms [default: 5000]
    #[arg(long, env = "CAIRN_REVOCATION_LAG_BOUND_MS")]
    pub revocation_lag_bound_ms: Option<u64>,
    /// Serve the FHIR API read-only over a store made by `cairn replay --into DIR` (give DIR with
    /// --store-dir): the past as the replay rebuilt it. Writes answer 405; tokens are the live
    /// server's; every access is recorded in the live audit trail (on the embedded log through the
    /// running live server of --data-dir)
    #[arg(long, env = "CAIRN_READ_ONLY", requires = "store_dir")]
    pub read_only: bool,
    /// The replay directory to serve with --read-only
    #[arg(long, env = "CAIRN_STORE_DIR", value_name = "DIR", requires = "read_only")]
    pub store_dir: Option<PathBuf>,
    /// With --read-only on Kafka: the live server's token issuer (its public URL); on the embedded log
    /// it is asked from the live server
    #[arg(long, env = "CAIRN_TOKEN_ISSUER", value_name = "URL", requires = "read_only")]
    pub token_issuer: Option<String>,
    /// Switch off sign-in with a Cairn password: users sign in only through upstream identity
    /// providers (`[[idp]]` in the config file, `cairn admin idp add`)
    #[arg(long, env = "CAIRN_NO_PASSWORD_LOGIN")]
    pub no_password_login: bool,
    /// Seed demo accounts (a patient, a practitioner, an auditor), a demo SMART app and a demo device
    /// client, and print how to use them
    #[arg(long, env = "CAIRN_DEMO")]
    pub demo: bool,
    /// LOCAL DEVELOPMENT ONLY: serve the FHIR API without authentication, as an anonymous actor.
    /// Refused on a non-loopback address.
    #[arg(long, env = "CAIRN_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Print events as JSON lines (one object per record, with its chain position).
    Tail(TailArgs),
    /// Walk every partition's hash chain; exit 0 if intact, non-zero at the first broken link.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Only this topic (default: every topic)
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this partition (default: every partition)
    #[arg(long)]
    pub partition: Option<u32>,
    /// First offset to print in each partition
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Print at most this many records per partition
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print the report as one JSON object instead of text
    #[arg(long)]
    pub json: bool,
    /// A public key (64 hex digits, or a file holding them, such as the server's
    /// keys/seal-ed25519.key.pub) whose signature every seal must carry; repeat for several sealers.
    /// Get it from the server's start-up log and keep a copy away from the log's machines.
    #[arg(long)]
    pub seal_public_key: Vec<String>,
    /// A JWKS saved from the server's /jwks: its Ed25519 (OKP) keys are the seal keys; may be given
    /// with --seal-public-key
    #[arg(long, value_name = "FILE")]
    pub jwks: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Log(LogCommand::Tail(args)) => logcmd::tail(args),
        Command::Log(LogCommand::Verify(args)) => logcmd::verify(args),
        Command::Audit(AuditCommand::Verify(args)) => auditcmd::verify(args),
        Command::Audit(AuditCommand::Export(args)) => auditcmd::export(args),
        Command::Audit(AuditCommand::Report(args)) => auditcmd::report(args),
        Command::Replay(args) => replaycmd::run(args),
        Command::Investigate(InvestigateCommand::Timeline(args)) => investigatecmd::timeline(args),
        Command::Investigate(InvestigateCommand::Seen(args)) => investigatecmd::seen(args),
        Command::Store(StoreCommand::Digest(args)) => storecmd::digest(args),
        Command::Migrate(args) => storecmd::migrate(args),
        Command::Bench(args) => bench::run(args),
        Command::Admin(args) => admin::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, no backtrace.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(": ");
                    line.push_str(&cause);
                }
            }
            eprintln!("cairn: error: {line}");
            ExitCode::from(1)
        }
    }
}
