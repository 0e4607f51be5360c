//! Shared harness for the integration tests: build and find the `cairn` binary, start a server on a
//! free port, stop it the way an operator would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `cairn` binary of this workspace, built (once per test run) in the same profile as the tests.
pub fn cairn_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/integration-<hash> -> target/<profile>/cairn
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", "cairn", "--bin", "cairn"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build for the cairn binary");
        assert!(status.success(), "building the cairn binary failed");
        let bin = profile_dir.join("cairn");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// Runs `cairn <args>` to completion; returns (exit status, stdout, stderr).
pub fn run_cairn(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(cairn_bin())
        .args(args)
        .env_remove("CAIRN_DATA_DIR")
        .env_remove("CAIRN_CONFIG")
        .env_remove("CAIRN_LISTEN")
        .stdin(Stdio::null())
        .output()
        .expect("run cairn");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `cairn <args>` to completion with `input` on its standard input.
pub fn run_cairn_with_stdin(args: &[&str], input: &str) -> (ExitStatus, String, String) {
    use std::io::Write;
    let mut child = Command::new(cairn_bin())
        .args(args)
        .env_remove("CAIRN_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cairn");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("run cairn");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A `cairn serve` child process on a free loopback port.
pub struct Server {
    child: Child,
    pub base_url: String,
    stderr_path: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// Starts the server with extra environment variables (for the child only).
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let stderr_dir = tempfile::tempdir().unwrap();
        let stderr_path = stderr_dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(cairn_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("CAIRN_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn cairn serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("cairn: listening on ") {
                    let url = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let base_url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("cairn serve did not start: {}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
            }
        };
        Server { child, base_url, stderr_path, _stderr_dir: stderr_dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, then wait (at most 30 s) for the exit status.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr());
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its servers said last (cargo prints a failed test's output):
        // a rare failure under the whole suite's load can then be understood from that run alone.
        if std::thread::panicking() {
            let stderr = self.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = &lines[lines.len().saturating_sub(SHOWN_ON_FAILURE)..];
            eprintln!("--- cairn serve at {}: the last {} lines of its stderr ---", self.base_url, tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// How many lines of a server's stderr a failing test shows.
const SHOWN_ON_FAILURE: usize = 80;

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

/// The Kafka brokers `infra/up` started (`CAIRN_KAFKA_BROKERS`). Tests that need Kafka are
/// `#[ignore]`d for plain `cargo test`; the README test command starts Kafka and runs them, and one
/// run without the variable fails here rather than passing silently.
pub fn kafka_brokers() -> String {
    std::env::var("CAIRN_KAFKA_BROKERS")
        .expect("CAIRN_KAFKA_BROKERS is not set: run the tests with infra/test, which starts Kafka (infra/up)")
}

/// The CQL contact points `infra/up` started (`CAIRN_SCYLLA_NODES`); see [`kafka_brokers`].
pub fn scylla_nodes() -> String {
    std::env::var("CAIRN_SCYLLA_NODES")
        .expect("CAIRN_SCYLLA_NODES is not set: run the tests with infra/test, which starts Cassandra (infra/up)")
}

/// A name no earlier run used, for topics, keyspaces and consumer groups on shared test servers.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}_{}_{:x}", std::process::id(), nanos)
}

/// Which event log and projection store a test deployment uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded log and store in the data directory.
    Embedded,
    /// Kafka and Cassandra started by `infra/up` (see [`kafka_brokers`]).
    KafkaCassandra,
}

/// One test's deployment: a data directory and, on Kafka and Cassandra, topics and a keyspace of its
/// own (prefix and keyspace named uniquely), so tests sharing the servers do not see each other.
pub struct Deployment {
    pub backend: Backend,
    dir: tempfile::TempDir,
    backend_args: Vec<String>,
    _servers: Option<std::sync::RwLockReadGuard<'static, ()>>,
}

static SHARED_SERVERS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by every test that uses the shared Kafka and Cassandra ...
pub fn shared_servers() -> std::sync::RwLockReadGuard<'static, ()> {
    SHARED_SERVERS.read().unwrap_or_else(|e| e.into_inner())
}

/// ... and, alone, by a test that restarts them (no other test sees the outage).
pub fn exclusive_servers() -> std::sync::RwLockWriteGuard<'static, ()> {
    SHARED_SERVERS.write().unwrap_or_else(|e| e.into_inner())
}

/// Runs an `infra/` script (e.g. `down kafka`) with this process's environment (the ports and run
/// dir `infra/test` exported); panics with its output if it fails.
pub fn infra(script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra").join(script);
    let out = Command::new(&path).args(args).output().expect("run an infra script");
    assert!(
        out.status.success(),
        "infra/{script} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Deployment {
    /// A fresh deployment; on Kafka and Cassandra this runs `cairn migrate` for its keyspace. Every
    /// deployment holds the shared-servers lock (see [`shared_servers`]): the test that restarts
    /// Kafka then runs alone, not starved of CPU by servers of other tests on the two cores.
    pub fn new(backend: Backend) -> Deployment {
        let guard = Some(shared_servers());
        let mut d = Self::unguarded(backend);
        d._servers = guard;
        d
    }

    /// A deployment for a test that already holds [`exclusive_servers`].
    pub fn unguarded(backend: Backend) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let backend_args = match backend {
            Backend::Embedded => Vec::new(),
            Backend::KafkaCassandra => {
                let name = unique_name("t");
                vec![
                    "--log".into(),
                    "kafka".into(),
                    "--kafka-brokers".into(),
                    kafka_brokers(),
                    "--kafka-topic-prefix".into(),
                    format!("{name}."),
                    "--store".into(),
                    "scylla".into(),
                    "--scylla-nodes".into(),
                    scylla_nodes(),
                    "--scylla-keyspace".into(),
                    name,
                ]
            }
        };
        let d = Deployment { backend, dir, backend_args, _servers: None };
        if backend == Backend::KafkaCassandra {
            let (status, out, err) = d.cairn(&["migrate"]);
            assert!(status.success(), "cairn migrate failed: {out}{err}");
        }
        d
    }

    /// A topic's name on the Kafka cluster (with this deployment's prefix).
    pub fn kafka_topic(&self, topic: &str) -> String {
        let prefix =
            self.backend_args.iter().position(|a| a == "--kafka-topic-prefix").map(|i| &self.backend_args[i + 1]);
        format!("{}{topic}", prefix.map(String::as_str).unwrap_or(""))
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `cairn serve` on this deployment, with `extra` flags.
    pub fn start(&self, extra: &[&str]) -> Server {
        let mut args: Vec<&str> = self.backend_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Server::start(self.dir.path(), &args)
    }

    /// Runs `cairn <args> --data-dir <dir> <backend flags>` to completion.
    pub fn cairn(&self, args: &[&str]) -> (ExitStatus, String, String) {
        run_cairn(&self.with_deployment_args(args))
    }

    /// Like [`Deployment::cairn`], with `input` on standard input.
    pub fn cairn_with_stdin(&self, args: &[&str], input: &str) -> (ExitStatus, String, String) {
        run_cairn_with_stdin(&self.with_deployment_args(args), input)
    }

    /// `cairn admin <args>` expected to succeed; its JSON answer.
    pub fn admin(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        let (status, out, err) = self.cairn(&all);
        assert!(status.success(), "cairn admin {args:?} failed: {out}{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("cairn admin {args:?} printed no JSON ({e}): {out}"))
    }

    /// Registers a confidential client with a secret (`cairn admin client register`); its id and secret.
    pub fn register_client(&self, name: &str, scope: &str) -> (String, String) {
        let c =
            self.admin(&["client", "register", "--name", name, "--kind", "confidential-symmetric", "--scope", scope]);
        let field = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("no {k} in {c}")).to_owned();
        (field("client_id"), field("client_secret"))
    }

    fn with_deployment_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--data-dir");
        all.push(self.dir.path().to_str().unwrap());
        all.extend(self.backend_args.iter().map(String::as_str));
        all
    }
}

/// Defines, for each named `fn(Backend)`, a test module with an `embedded` test and a
/// `kafka_cassandra` test (ignored for plain `cargo test`; the README test command runs it).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn embedded() {
                    super::$name($crate::Backend::Embedded)
                }

                #[test]
                #[ignore = "needs Kafka and Cassandra: run with infra/test (it starts them)"]
                fn kafka_cassandra() {
                    super::$name($crate::Backend::KafkaCassandra)
                }
            }
        )*
    };
}
