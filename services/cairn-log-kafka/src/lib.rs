//! The event log on Apache Kafka: [`KafkaLog`] implements [`cairn_log::EventLog`] with `rdkafka`.
//!
//! - **Appends** go through one transactional producer (`acks=all`, idempotence, which transactions
//!   imply). A writer task groups the appends that arrive while a transaction commits into the next
//!   one (group commit, as the embedded log groups fsyncs), so every `append_batch` is atomic across
//!   partitions and topics, and an append is acknowledged only after its transaction committed and
//!   every record's delivery report came back, and its first record reads back committed (a commit
//!   librdkafka reported was once aborted by the broker; see `Confirmer`). A failed transaction is
//!   aborted and its callers get an error: nothing half-written is ever readable.
//! - **Partitions** are chosen with the same murmur2 partitioner as the embedded backend (and Kafka's
//!   own clients), set explicitly on each record.
//! - **Reads** use `isolation.level=read_committed`, so aborted records are never seen. Transaction
//!   markers take offsets that no reader receives; tails report how far they have passed
//!   ([`Tailed::Passed`]) at the end of each partition, which is how projectors know they are caught up.
//! - **Topics** are created with the configured replication factor, unlimited retention (the log is the
//!   record; it is never compacted or expired) and `LogAppendTime` timestamps (the log's clock).
//! - **Chain**: Kafka cannot chain records at append (several processes write one partition, and Kafka
//!   has no compare-and-set), so records come back with `prev_hash = None`; the chain over a
//!   partition's committed records is computed by readers ([`chain_partition`]) and checked by
//!   `cairn log verify`. See docs/decisions/0005-kafka-log.md.
//!
//! Blocking librdkafka calls (metadata, watermarks, transaction control) run on tokio's blocking pool.

use async_trait::async_trait;
use cairn_log::{EventLog, Hash, LogError, NewRecord, Position, Record, Result, Tailed, TopicInfo, validate_name};
use futures_util::stream::BoxStream;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How Cairn connects to Kafka and creates its topics.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port,host:port`
    pub brokers: String,
    /// Replicas per partition for topics Cairn creates (3 in production, 1 on a one-node test broker).
    pub replication_factor: i32,
    /// `min.insync.replicas` for topics Cairn creates (2 in production with 3 replicas).
    pub min_insync_replicas: i32,
    /// Identifies this process's transactional producer. Two live processes must not share it (the
    /// newer fences the older); a process restarted with the same id fences its own zombie.
    pub transactional_id: String,
    /// The largest record the topics and the producer accept.
    pub max_record_bytes: usize,
    /// How long an append may take before it fails (and the caller fails closed).
    pub timeout: Duration,
    /// Prepended to every topic and consumer-group name on the cluster (and stripped when reading),
    /// so several Cairn deployments, or test runs, can share one cluster. Empty by default.
    pub topic_prefix: String,
    /// For commands that only read (`log tail`, `log verify`): no transactional producer is created,
    /// and appends answer `ReadOnly`.
    pub read_only: bool,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            replication_factor: 1,
            min_insync_replicas: 1,
            transactional_id: format!("cairn-{}", uuid_like()),
            max_record_bytes: 16 << 20,
            timeout: Duration::from_secs(10),
            topic_prefix: String::new(),
            read_only: false,
        }
    }
}

/// A process-unique suffix without pulling in a UUID crate: pid, start time and a counter.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{}-{:x}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Appends waiting for the writer task: the records and where to send their positions.
struct PendingAppend {
    records: Vec<Routed>,
    reply: oneshot::Sender<Result<Vec<Position>>>,
}

/// A record with the partition its key routes to.
struct Routed {
    partition: u32,
    /// The topic's name on the cluster (with the prefix).
    wire_topic: String,
    record: NewRecord,
}

/// The most records one transaction carries; appends beyond wait for the next.
const MAX_RECORDS_PER_TRANSACTION: usize = 8192;

pub struct KafkaLog {
    settings: KafkaSettings,
    topics: Arc<RwLock<BTreeMap<String, u32>>>,
    admin: AdminClient<DefaultClientContext>,
    /// Metadata and watermark queries (read_uncommitted: its end offsets are high watermarks).
    meta: Arc<MetaClient>,
    appends: mpsc::Sender<PendingAppend>,
    /// Set while the transactional producer is broken (a failed transaction that could not be
    /// aborted, a fatal error) and not yet replaced: `/readyz` reports it. The writer replaces the
    /// producer before the next transaction.
    failure: Arc<Mutex<Option<String>>>,
    groups: Mutex<HashMap<String, Arc<Reader>>>,
    /// Consumers for `read`.
    readers: Arc<ReaderPool>,
    /// Reads records back read committed (the writer's, before it acknowledges, and `committed`).
    confirmer: Arc<Confirmer>,
}

/// A Kafka client error: the cluster is away or failing for now (the clients reconnect, the writer
/// replaces a broken producer), so the call fails and later ones may succeed.
fn kafka_err(context: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("kafka: {context}: {e}"))
}

impl KafkaLog {
    /// Connects, initialises the transactional producer (fencing any earlier process that used the
    /// same transactional id) and loads the topics' metadata.
    pub async fn connect(settings: KafkaSettings) -> Result<KafkaLog> {
        let admin: AdminClient<DefaultClientContext> =
            base_config(&settings).create().map_err(|e| kafka_err("admin client", e))?;
        // Watermarks must be the high watermark, not the last stable offset that a read_committed
        // client gets: right after our transaction commits, its markers may not be written yet, and
        // an end offset that stops short of our records would let a read skip its own writes.
        let meta = Arc::new(MetaClient::new(&settings)?);
        let producer = if settings.read_only { None } else { Some(start_producer(&settings).await?) };
        let topics = Arc::new(RwLock::new(BTreeMap::new()));
        let log = {
            let (tx, rx) = mpsc::channel(4096);
            let failure = Arc::new(Mutex::new(None));
            let confirmer = Arc::new(Confirmer::new(&settings));
            let readers = Arc::new(ReaderPool::new(
                // A read ends at the partition's end, which a fetch reports only after waiting this long
                // for more data: keep it short (tails keep the default and are woken by new data).
                consumer_config(&settings, &format!("{}cairn-reader", settings.topic_prefix))
                    .set("fetch.wait.max.ms", "20")
                    .clone(),
                usize::MAX,
            ));
            if let Some(producer) = producer {
                tokio::spawn(writer(settings.clone(), Some(producer), rx, failure.clone(), confirmer.clone()));
            }
            KafkaLog {
                settings,
                topics,
                admin,
                meta,
                appends: tx,
                failure,
                groups: Mutex::new(HashMap::new()),
                readers,
                confirmer,
            }
        };
        log.refresh_topics().await?;
        Ok(log)
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Whether the record at `at` of `topic` is committed (`true`) or was aborted (`false`), read
    /// back read committed, as every append is before it is acknowledged. An error when that is not
    /// settled within the timeout (a transaction still open before it, the broker away).
    pub async fn committed(&self, topic: &str, at: Position) -> Result<bool> {
        self.check_partition(topic, at.partition)?;
        let probe = Probe { topic: self.wire(topic), at, key: None };
        match self.confirmer.confirm(probe, Instant::now() + self.settings.timeout).await {
            Ok(()) => Ok(true),
            Err(Unconfirmed::Aborted(_)) => Ok(false),
            Err(Unconfirmed::Unknown(detail)) => Err(kafka_err("reading back", detail)),
        }
    }

    /// Why appends are refused, if they are.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// Reloads every topic's partition count from the cluster.
    pub async fn refresh_topics(&self) -> Result<()> {
        let meta = self.meta.clone();
        let timeout = self.settings.timeout;
        let prefix = self.settings.topic_prefix.clone();
        let found = blocking(move || {
            let md = meta.query(|c| c.fetch_metadata(None, timeout)).map_err(|e| kafka_err("fetching metadata", e))?;
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
                .filter_map(|t| Some((t.name().strip_prefix(&prefix)?.to_owned(), t.partitions().len() as u32)))
                .collect::<BTreeMap<_, _>>())
        })
        .await?;
        *self.topics.write().unwrap() = found;
        Ok(())
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<()> {
        let partitions = self.partitions(topic)?;
        if partition >= partitions {
            return Err(LogError::UnknownPartition { topic: topic.to_owned(), partition, partitions });
        }
        Ok(())
    }

    /// A name on the cluster: the configured prefix, then `name`.
    fn wire(&self, name: &str) -> String {
        format!("{}{name}", self.settings.topic_prefix)
    }

    /// Drops a group's client after a failure, so the next call makes a fresh one (see [`MetaClient`]:
    /// an idle client may not reconnect after a broker restart).
    fn forget_group_consumer(&self, group: &str) {
        self.groups.lock().unwrap().remove(group);
    }

    fn group_consumer(&self, group: &str) -> Result<Arc<Reader>> {
        validate_name(group)?;
        let mut groups = self.groups.lock().unwrap();
        if let Some(c) = groups.get(group) {
            return Ok(c.clone());
        }
        let c: Reader = consumer_config(&self.settings, &self.wire(group))
            .create_with_context(CairnContext)
            .map_err(|e| kafka_err("group consumer", e))?;
        let c = Arc::new(c);
        groups.insert(group.to_owned(), c.clone());
        Ok(c)
    }
}

/// The client context of Cairn's consumers: librdkafka's reports go to `tracing`, except "end of
/// partition", which is how our reads learn they are done and not a fault.
pub struct CairnContext;

impl rdkafka::client::ClientContext for CairnContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(facility = fac, "librdkafka: {message}"),
            Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
            _ => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            tracing::warn!(error = %error, "kafka client: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for CairnContext {}

type Reader = BaseConsumer<CairnContext>;

/// The client for metadata and watermark queries, replaced when a query fails. librdkafka connects
/// an idle client's brokers only when a request needs them, and after a broker restart this client's
/// leader lookups kept failing at once ("all brokers down", "unknown partition") for minutes without
/// reconnecting: reads, `/readyz` and the sealer stayed down with the broker long back (the Kafka
/// restart test, under CPU load). A fresh client bootstraps anew.
struct MetaClient {
    settings: KafkaSettings,
    /// The client and when it was made.
    current: Mutex<(Arc<Reader>, Instant)>,
}

/// The errors of a client that lost its brokers (what the stuck client answered), as opposed to a
/// slow broker (a timeout, which a retry would only double) or a real answer (an unknown topic).
fn lost_its_brokers(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::DestroyBroker
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    )
}

/// A failing client is replaced at most this often.
const META_REPLACE_INTERVAL: Duration = Duration::from_secs(1);

impl MetaClient {
    fn new(settings: &KafkaSettings) -> Result<MetaClient> {
        let client = Self::create(settings).map_err(|e| kafka_err("metadata client", e))?;
        Ok(MetaClient { settings: settings.clone(), current: Mutex::new((Arc::new(client), Instant::now())) })
    }

    fn create(settings: &KafkaSettings) -> KafkaResult<Reader> {
        consumer_config(settings, "cairn-meta")
            .set("isolation.level", "read_uncommitted")
            .create_with_context(CairnContext)
    }

    /// Runs a blocking `query`; if it fails for want of a broker, runs it once more on a fresh client.
    fn query<T>(&self, query: impl Fn(&Reader) -> KafkaResult<T>) -> KafkaResult<T> {
        let client = self.current.lock().unwrap().0.clone();
        let first = match query(&client) {
            Ok(v) => return Ok(v),
            Err(e) if !lost_its_brokers(&e) => return Err(e),
            Err(e) => e,
        };
        let fresh = {
            let mut current = self.current.lock().unwrap();
            if !Arc::ptr_eq(&current.0, &client) {
                // Another query replaced it meanwhile.
                current.0.clone()
            } else if current.1.elapsed() < META_REPLACE_INTERVAL {
                return Err(first);
            } else {
                let Ok(c) = Self::create(&self.settings) else { return Err(first) };
                tracing::warn!(error = %first, "kafka: metadata query failed; retrying on a new client");
                *current = (Arc::new(c), Instant::now());
                current.0.clone()
            }
        };
        query(&fresh)
    }
}

fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("client.id", "cairn")
        .set("socket.timeout.ms", settings.timeout.as_millis().to_string())
        .set("socket.nagle.disable", "true")
        // librdkafka logs through its own callback into `log`; keep it to warnings.
        .set("log_level", "4");
    // Troubleshooting: librdkafka's debug contexts (e.g. `eos,protocol`), logged at debug level.
    if let Ok(contexts) = std::env::var("CAIRN_KAFKA_DEBUG") {
        c.set("debug", contexts).set("log_level", "7");
    }
    c
}

/// A consumer that never commits on its own and sees only committed transactions.
fn consumer_config(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut c = base_config(settings);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("fetch.max.bytes", (settings.max_record_bytes * 4).to_string())
        .set("auto.offset.reset", "earliest");
    c
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| LogError::Failed(format!("kafka: blocking task: {e}")))?
}

/// Creates the transactional producer and initialises its transactions, which fences any earlier
/// producer with the same transactional id (a zombie of this process, or the one it replaces).
async fn start_producer(settings: &KafkaSettings) -> Result<Arc<FutureProducer>> {
    let producer: FutureProducer = base_config(settings)
        .set("transactional.id", &settings.transactional_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.max.bytes", (settings.max_record_bytes + 4096).to_string())
        // An abandoned transaction (its process died) blocks read_committed readers of its
        // partitions until it times out: keep that short. A stable transactional id fences it sooner.
        .set("transaction.timeout.ms", "15000")
        // Back-to-back transactions: the coordinator answers CONCURRENT_TRANSACTIONS until the previous
        // transaction's markers are written, and the client retries after this backoff. At the default
        // (100 ms, doubling) every transaction waited about 200 ms; measured in docs/performance.md.
        .set("retry.backoff.ms", "5")
        .set("retry.backoff.max.ms", "50")
        .create()
        .map_err(|e| kafka_err("producer", e))?;
    let producer = Arc::new(producer);
    let timeout = settings.timeout;
    let p = producer.clone();
    blocking(move || p.init_transactions(timeout).map_err(|e| kafka_err("initialising transactions", e))).await?;
    Ok(producer)
}

/// The writer task: takes every append waiting, sends them in one transaction, commits, and answers
/// each caller with its positions (or the error).
async fn writer(
    settings: KafkaSettings,
    mut producer: Option<Arc<FutureProducer>>,
    mut rx: mpsc::Receiver<PendingAppend>,
    failure: Arc<Mutex<Option<String>>>,
    confirmer: Arc<Confirmer>,
) {
    let timeout = settings.timeout;
    // Which producer is current (counted from 1), and the one whose reported commit the broker did
    // not make (0: none): that producer's account of its transactions is not to be trusted, so it is
    // replaced before its next transaction. A late verdict on an already replaced one is ignored.
    let mut generation: u64 = 1;
    let contradicted = Arc::new(AtomicU64::new(0));
    // Read-backs in flight: while the partitions' stable offset is held up (another process's
    // transaction open), commits go on succeeding and would pile up probes, each holding a thread
    // and a consumer. At the limit the writer waits before its next transaction.
    let probes = Arc::new(tokio::sync::Semaphore::new(MAX_PROBES));
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut count = group[0].records.len();
        while count < MAX_RECORDS_PER_TRANSACTION {
            match rx.try_recv() {
                Ok(p) => {
                    count += p.records.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        if contradicted.load(Ordering::Relaxed) == generation {
            producer = None;
        }
        // After a broken transaction the producer is replaced before the next one (a broker restart
        // or a network cut must not stop appends for good). Until that works, appends fail (503).
        let current = match &producer {
            Some(p) => p.clone(),
            None => match start_producer(&settings).await {
                Ok(p) => {
                    tracing::info!("kafka producer restarted; appends resume");
                    *failure.lock().unwrap() = None;
                    generation += 1;
                    producer = Some(p.clone());
                    p
                }
                Err(e) => {
                    *failure.lock().unwrap() = Some(e.to_string());
                    refuse(group, || LogError::Unavailable(format!("kafka producer unavailable: {e}")));
                    continue;
                }
            },
        };
        let Ok(permit) = probes.clone().acquire_owned().await else { return };
        let started = Instant::now();
        match transaction(&current, &group, timeout).await {
            Ok(positions) => {
                metrics::histogram!("cairn_log_fsync_seconds").record(started.elapsed().as_secs_f64());
                metrics::histogram!("cairn_log_fsync_batch_records").record(count as f64);
                // Acknowledged only once the transaction's first record reads back committed. This
                // runs beside the next transaction, which waits for this one's markers anyway.
                let probe = group.iter().zip(&positions).find_map(|(p, pos)| {
                    let first = p.records.first()?;
                    Some(Probe {
                        topic: first.wire_topic.clone(),
                        at: *pos.first()?,
                        key: Some(first.record.key.clone()),
                    })
                });
                let (confirmer, contradicted) = (confirmer.clone(), contradicted.clone());
                let this_generation = generation;
                let deadline = Instant::now() + timeout;
                tokio::spawn(async move {
                    let confirming = Instant::now();
                    let outcome = match probe {
                        Some(probe) => confirmer.confirm(probe, deadline).await,
                        None => Ok(()),
                    };
                    drop(permit);
                    metrics::histogram!("cairn_log_readback_seconds").record(confirming.elapsed().as_secs_f64());
                    match outcome {
                        Ok(()) => {
                            metrics::counter!("cairn_log_appended_records_total").increment(count as u64);
                            for (p, pos) in group.into_iter().zip(positions) {
                                let _ = p.reply.send(Ok(pos));
                            }
                        }
                        Err(Unconfirmed::Aborted(detail)) => {
                            tracing::error!(
                                records = count,
                                "kafka reported a transaction committed that the broker aborted ({detail}); its \
                                 appends are refused and the producer is replaced"
                            );
                            metrics::counter!("cairn_log_commits_contradicted_total").increment(1);
                            contradicted.store(this_generation, Ordering::Relaxed);
                            refuse(group, || {
                                LogError::Unavailable(format!(
                                    "kafka: the broker aborted a transaction reported committed: {detail}"
                                ))
                            });
                        }
                        Err(Unconfirmed::Unknown(detail)) => {
                            tracing::error!(records = count, "kafka commit not confirmed: {detail}");
                            refuse(group, || {
                                LogError::OutcomeUnknown(format!("kafka: commit not confirmed: {detail}"))
                            });
                        }
                    }
                });
            }
            Err((e, unusable)) => {
                drop(permit);
                tracing::error!(error = %e, records = count, "kafka transaction failed; its appends are refused");
                if unusable {
                    *failure.lock().unwrap() = Some(e.to_string());
                    producer = None;
                }
                refuse(group, || match &e {
                    TransactionError::Unknown(_) => LogError::OutcomeUnknown(format!("kafka: {e}")),
                    TransactionError::Failed(_) => LogError::Unavailable(format!("kafka transaction failed: {e}")),
                });
            }
        }
    }
}

/// Answers every append of `group` with the error `refusal` makes.
fn refuse(group: Vec<PendingAppend>, refusal: impl Fn() -> LogError) {
    for p in group {
        let _ = p.reply.send(Err(refusal()));
    }
}

/// Idle consumers of one configuration, reused: creating one costs a connection and a metadata round
/// trip. Each is assigned by whoever takes it and unassigned when given back.
struct ReaderPool {
    config: ClientConfig,
    idle: Mutex<Vec<Reader>>,
    /// The most idle consumers kept; more given back are dropped.
    keep: usize,
}

impl ReaderPool {
    fn new(config: ClientConfig, keep: usize) -> ReaderPool {
        ReaderPool { config, idle: Mutex::new(Vec::new()), keep }
    }

    /// An idle consumer, or a new one.
    fn take(&self) -> KafkaResult<Reader> {
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(c) => Ok(c),
            None => self.fresh(),
        }
    }

    /// A new consumer, never used before.
    fn fresh(&self) -> KafkaResult<Reader> {
        self.config.create_with_context(CairnContext)
    }

    fn give_back(&self, consumer: Reader) {
        if consumer.unassign().is_ok() {
            let mut idle = self.idle.lock().unwrap();
            if idle.len() < self.keep {
                idle.push(consumer);
            }
        }
    }
}

/// Reads back, read committed, the first record of each committed transaction before its appends
/// are acknowledged. librdkafka's successful `commit_transaction` was once followed by the broker
/// aborting the transaction (the Kafka restart test: two acknowledged creates, committed seconds
/// before a controlled broker shutdown, read back nowhere); a record that reads back committed is
/// committed whatever the client library believed. A Kafka transaction commits or aborts as a
/// whole, so one record per transaction settles all of them.
struct Confirmer {
    /// Consumers assigned per probe (never in a group's rebalance), at most [`MAX_PROBES`] kept; one
    /// whose probe did not settle is dropped, not kept (after a broker restart a client can stay
    /// stuck for minutes: see [`MetaClient`]).
    readers: ReaderPool,
}

/// The most read-backs in flight (and idle consumers kept for them).
const MAX_PROBES: usize = 8;

/// The record a probe reads back: where the delivery report put it, and, when known, its key (a
/// record with another key there is not ours).
struct Probe {
    /// The topic's name on the cluster.
    topic: String,
    at: Position,
    key: Option<Vec<u8>>,
}

/// Why a committed transaction is not acknowledged.
#[derive(Debug)]
enum Unconfirmed {
    /// A read-committed reader passed the record without receiving it: the transaction was aborted.
    Aborted(String),
    /// Not readable in time (a broker away, another process's transaction still open before it).
    Unknown(String),
}

impl Confirmer {
    fn new(settings: &KafkaSettings) -> Confirmer {
        let config = consumer_config(settings, &format!("{}cairn-confirm", settings.topic_prefix))
            // A probe usually waits for the commit markers, which the broker writes a moment after
            // the commit: fetch again at once rather than idle. Measured (Kafka creates, one
            // connection): p50 11 ms at 10 ms, 5.7-6.3 ms at 1 ms, the same as without the probe.
            .set("fetch.wait.max.ms", "1")
            .clone();
        Confirmer { readers: ReaderPool::new(config, MAX_PROBES) }
    }

    /// Whether the probed record reads back committed by `deadline`. A verdict of "aborted" is
    /// checked again on a new consumer before it is believed.
    async fn confirm(self: &Arc<Self>, probe: Probe, deadline: Instant) -> std::result::Result<(), Unconfirmed> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let unavailable = |e: KafkaError| Unconfirmed::Unknown(format!("reader: {e}"));
            let consumer = this.readers.take().map_err(unavailable)?;
            let verdict = read_back(&consumer, &probe, deadline);
            if verdict.is_ok() {
                this.readers.give_back(consumer);
            }
            match verdict {
                Err(Unconfirmed::Aborted(_)) => {
                    read_back(&this.readers.fresh().map_err(unavailable)?, &probe, deadline)
                }
                other => other,
            }
        })
        .await
        .unwrap_or_else(|e| Err(Unconfirmed::Unknown(format!("blocking task: {e}"))))
    }
}

/// Reads the probed topic read committed from the probed offset until its record arrives
/// (committed), a later one arrives or the end of what is committed lies past it (aborted), or
/// `deadline` passes.
fn read_back(consumer: &Reader, probe: &Probe, deadline: Instant) -> std::result::Result<(), Unconfirmed> {
    let (topic, at) = (probe.topic.as_str(), probe.at);
    let partition = at.partition as i32;
    assign(consumer, topic, at.partition, at.offset).map_err(|e| Unconfirmed::Unknown(e.to_string()))?;
    let mut last_error = None;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(50)) {
            // A reused reader must not hand over anything left from its previous assignment.
            Some(Ok(m)) if m.topic() != topic || m.partition() != partition || (m.offset() as u64) < at.offset => {}
            Some(Ok(m)) if m.offset() as u64 == at.offset => {
                return match probe.key.as_deref().is_none_or(|key| m.key().unwrap_or_default() == key) {
                    true => Ok(()),
                    false => Err(Unconfirmed::Aborted(format!(
                        "{topic} partition {partition}: offset {} holds another record",
                        at.offset
                    ))),
                };
            }
            Some(Ok(m)) => {
                return Err(Unconfirmed::Aborted(format!(
                    "{topic} partition {partition}: offset {} came next after {}",
                    m.offset(),
                    at.offset
                )));
            }
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => {
                let passed =
                    position(consumer, topic, at.partition).map_err(|e| Unconfirmed::Unknown(e.to_string()))?;
                if let Some(end) = passed.filter(|end| *end > at.offset) {
                    return Err(Unconfirmed::Aborted(format!(
                        "{topic} partition {partition}: offset {} not among the committed records up to {end}",
                        at.offset
                    )));
                }
                // The markers are not written yet (or an older transaction is still open): wait.
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            // A broker away: librdkafka reconnects; keep trying until the deadline.
            Some(Err(e)) => last_error = Some(e.to_string()),
        }
    }
    Err(Unconfirmed::Unknown(format!(
        "{topic} partition {partition} offset {} not readable in time{}",
        at.offset,
        last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )))
}

/// Why a transaction's appends were not acknowledged.
#[derive(Debug)]
enum TransactionError {
    /// Aborted or never sent: nothing of it is readable.
    Failed(KafkaError),
    /// The commit did not answer in time and may still complete.
    Unknown(KafkaError),
}

impl std::fmt::Display for TransactionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransactionError::Failed(e) => write!(f, "{e}"),
            TransactionError::Unknown(e) => write!(f, "commit outcome unknown: {e}"),
        }
    }
}

enum Outcome {
    Failed(KafkaError),
    Unknown(KafkaError),
}

/// Commits, retrying while librdkafka says the commit is retriable (it goes on in the background: a
/// retry waits for it), until `COMMIT_ATTEMPTS` attempts of `timeout` each have passed.
async fn commit(producer: &Arc<FutureProducer>, timeout: Duration) -> std::result::Result<(), Outcome> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let p = producer.clone();
        let result = tokio::task::spawn_blocking(move || p.commit_transaction(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled));
        match result {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.txn_requires_abort() => {
                if attempt >= COMMIT_ATTEMPTS {
                    return Err(Outcome::Unknown(KafkaError::Transaction(e)));
                }
                tracing::warn!(error = %e, attempt, "kafka commit not confirmed yet; retrying");
            }
            Err(e) => return Err(Outcome::Failed(e)),
        }
    }
}

const COMMIT_ATTEMPTS: u32 = 3;

/// Sends the group's records in one transaction. On error the transaction is aborted; the flag says
/// whether the producer is unusable from now on.
async fn transaction(
    producer: &Arc<FutureProducer>,
    group: &[PendingAppend],
    timeout: Duration,
) -> std::result::Result<Vec<Vec<Position>>, (TransactionError, bool)> {
    // A fatal error (fenced by a newer process with our transactional id, or a broken producer)
    // leaves the producer unusable: the log fails closed until restart.
    let fatal = |e: &KafkaError| {
        matches!(e, KafkaError::Transaction(r) if r.is_fatal())
            || matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced))
    };
    producer.begin_transaction().map_err(|e| {
        let f = fatal(&e);
        (TransactionError::Failed(e), f)
    })?;
    let mut deliveries = Vec::with_capacity(group.len());
    let mut send_error = None;
    'send: for p in group {
        let mut these = Vec::with_capacity(p.records.len());
        for r in &p.records {
            let record = FutureRecord::to(&r.wire_topic)
                .partition(r.partition as i32)
                .key(&r.record.key[..])
                .payload(&r.record.value[..]);
            match producer.send_result(record) {
                Ok(f) => these.push(f),
                Err((e, _)) => {
                    send_error = Some(e);
                    break 'send;
                }
            }
        }
        deliveries.push(these);
    }
    // Wait for every delivery report before committing. rust-rdkafka's commit_transaction first
    // flushes, and its flush sleeps in 100 ms polls while anything is in flight: measured, every
    // transaction took 100 ms longer. Once every record is acknowledged, the flush returns at once.
    let mut positions = Vec::with_capacity(deliveries.len());
    let mut failed = send_error;
    if failed.is_none() {
        'deliver: for these in deliveries {
            let mut out = Vec::with_capacity(these.len());
            for f in these {
                match tokio::time::timeout(timeout, f).await {
                    Ok(Ok(Ok(d))) => out.push(Position { partition: d.partition as u32, offset: d.offset as u64 }),
                    Ok(Ok(Err((e, _)))) => {
                        failed = Some(e);
                        break 'deliver;
                    }
                    Ok(Err(_)) => {
                        failed = Some(KafkaError::Canceled);
                        break 'deliver;
                    }
                    Err(_) => {
                        failed = Some(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut));
                        break 'deliver;
                    }
                }
            }
            positions.push(out);
        }
    }
    let committed = match failed {
        Some(e) => Err(Outcome::Failed(e)),
        None => commit(producer, timeout).await,
    };
    match committed {
        Ok(()) => {}
        // The commit may still complete: do not abort, and do not say nothing was stored.
        Err(Outcome::Unknown(e)) => return Err((TransactionError::Unknown(e), true)),
        Err(Outcome::Failed(e)) => {
            let f = fatal(&e);
            // A delivery that timed out: after a broker restart the producer kept timing out every
            // transaction for minutes (its partitions' leaders not relearned) while new clients
            // worked at once; replacing it (a new transactional session) is what recovers.
            let stuck = matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageTimedOut));
            let p = producer.clone();
            let aborted = tokio::task::spawn_blocking(move || p.abort_transaction(timeout)).await;
            let abort_failed = !matches!(aborted, Ok(Ok(())));
            return Err((TransactionError::Failed(e), f || abort_failed || stuck));
        }
    }
    Ok(positions)
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        validate_name(topic)?;
        if !(1..=1024).contains(&partitions) {
            return Err(LogError::InvalidPartitionCount(partitions));
        }
        if let Ok(existing) = self.partitions(topic) {
            return if existing == partitions {
                Ok(())
            } else {
                Err(LogError::TopicMismatch { topic: topic.to_owned(), existing, requested: partitions })
            };
        }
        let max_bytes = (self.settings.max_record_bytes + 4096).to_string();
        let min_isr = self.settings.min_insync_replicas.to_string();
        let wire = self.wire(topic);
        let new = NewTopic::new(&wire, partitions as i32, TopicReplication::Fixed(self.settings.replication_factor))
            // The log is the record: never expired, never compacted.
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1")
            .set("cleanup.policy", "delete")
            .set("message.timestamp.type", "LogAppendTime")
            .set("max.message.bytes", &max_bytes)
            .set("min.insync.replicas", &min_isr);
        let options = AdminOptions::new().operation_timeout(Some(self.settings.timeout));
        let results = self.admin.create_topics([&new], &options).await.map_err(|e| kafka_err("creating topic", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(kafka_err(&format!("creating topic {name}"), code)),
            }
        }
        // Metadata propagates asynchronously; wait until the broker reports every partition.
        let deadline = Instant::now() + self.settings.timeout;
        loop {
            self.refresh_topics().await?;
            match self.partitions(topic) {
                Ok(existing) if existing == partitions => return Ok(()),
                Ok(existing) if existing != 0 => {
                    return Err(LogError::TopicMismatch { topic: topic.to_owned(), existing, requested: partitions });
                }
                _ if Instant::now() > deadline => {
                    return Err(kafka_err("creating topic", format!("{topic} did not appear in the metadata")));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn topics(&self) -> Vec<TopicInfo> {
        let topics = self.topics.read().unwrap();
        topics.iter().map(|(name, &partitions)| TopicInfo { name: name.clone(), partitions }).collect()
    }

    fn partitions(&self, topic: &str) -> Result<u32> {
        self.topics.read().unwrap().get(topic).copied().ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
    }

    async fn append_batch(&self, records: Vec<NewRecord>) -> Result<Vec<Position>> {
        if records.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        if self.settings.read_only {
            return Err(LogError::ReadOnly);
        }
        let mut routed = Vec::with_capacity(records.len());
        for record in records {
            let size = record.key.len() + record.value.len();
            if size > self.settings.max_record_bytes {
                return Err(LogError::TooLarge { size, limit: self.settings.max_record_bytes });
            }
            let partition = self.partition_for(&record.topic, &record.key)?;
            routed.push(Routed { partition, wire_topic: self.wire(&record.topic), record });
        }
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        self.appends.send(PendingAppend { records: routed, reply }).await.map_err(|_| LogError::Closed)?;
        let positions = answer.await.map_err(|_| LogError::Closed)??;
        metrics::histogram!("cairn_log_append_seconds").record(started.elapsed().as_secs_f64());
        Ok(positions)
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>> {
        self.check_partition(topic, partition)?;
        let topic = self.wire(topic);
        let prefix = self.settings.topic_prefix.len();
        let timeout = self.settings.timeout;
        let pool = self.readers.clone();
        let meta = self.meta.clone();
        blocking(move || {
            // The high watermark, not the last stable offset: right after a commit the markers may not
            // be written yet, and the read must still reach records already acknowledged.
            let (_, high) = meta
                .query(|c| c.fetch_watermarks(&topic, partition as i32, timeout))
                .map_err(|e| kafka_err("reading watermarks", e))?;
            if from >= high.max(0) as u64 || max == 0 {
                return Ok(Vec::new());
            }
            let consumer = pool.take().map_err(|e| kafka_err("reader", e))?;
            let result = read_with(&consumer, &topic, partition, from, high as u64, max, prefix, timeout);
            pool.give_back(consumer);
            result
        })
        .await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64> {
        self.check_partition(topic, partition)?;
        let meta = self.meta.clone();
        let topic = self.wire(topic);
        let timeout = self.settings.timeout;
        blocking(move || {
            let (_, high) = meta
                .query(|c| c.fetch_watermarks(&topic, partition as i32, timeout))
                .map_err(|e| kafka_err("reading watermarks", e))?;
            Ok(high.max(0) as u64)
        })
        .await
    }

    fn tail(&self, topic: &str, partition: u32, from: u64) -> BoxStream<'static, Result<Tailed>> {
        self.tail_partitions(topic, &[(partition, from)])
    }

    fn tail_partitions(&self, topic: &str, from: &[(u32, u64)]) -> BoxStream<'static, Result<Tailed>> {
        let checked: Result<()> = from.iter().try_for_each(|&(p, _)| self.check_partition(topic, p));
        let config = consumer_config(&self.settings, &self.wire("cairn-tail"));
        let topic = self.wire(topic);
        let prefix = self.settings.topic_prefix.len();
        let from = from.to_vec();
        Box::pin(async_stream::try_stream! {
            checked?;
            let consumer: StreamConsumer<CairnContext> =
                config.create_with_context(CairnContext).map_err(|e| kafka_err("tail consumer", e))?;
            let mut tpl = TopicPartitionList::new();
            for &(p, offset) in &from {
                tpl.add_partition_offset(&topic, p as i32, Offset::Offset(offset as i64))
                    .map_err(|e| kafka_err("assign", e))?;
            }
            consumer.assign(&tpl).map_err(|e| kafka_err("assign", e))?;
            loop {
                match consumer.recv().await {
                    Ok(m) => yield Tailed::Record(to_record(&m, prefix)),
                    Err(KafkaError::PartitionEOF(p)) => {
                        // At the end of what is committed, the consumer's position has passed any
                        // transaction markers: report it so readers know they are caught up.
                        let partition = p as u32;
                        if let Some(next_offset) = position(&consumer, &topic, partition)? {
                            yield Tailed::Passed { partition, next_offset };
                        }
                    }
                    Err(e) if is_fatal(&e) => Err(kafka_err("tailing", e))?,
                    Err(e) => {
                        // Broker restarts and network blips: librdkafka reconnects by itself.
                        tracing::warn!(error = %e, topic = %topic, "kafka tail: transient error, retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    }

    fn assignments(&self, group: &str, topic: &str) -> BoxStream<'static, Result<Vec<u32>>> {
        let checked = validate_name(group).and_then(|()| self.partitions(topic));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) = checked {
            let _ = tx.send(Err(e));
        } else {
            let mut config = base_config(&self.settings);
            config
                .set("group.id", self.wire(group))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                // A dead member's partitions move to the others after this long without heartbeats.
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "1000");
            let topic = self.wire(topic);
            let prefix = self.settings.topic_prefix.len();
            // librdkafka runs the group protocol while the consumer is polled: a thread of its own
            // polls it; the assigned partitions are paused, since records are read by tails.
            std::thread::Builder::new()
                .name("cairn-kafka-group".into())
                .spawn(move || membership(config, topic, prefix, tx))
                .expect("spawn the group-membership thread");
        }
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    }

    async fn commit_offset(&self, group: &str, topic: &str, partition: u32, next_offset: u64) -> Result<()> {
        self.check_partition(topic, partition)?;
        let consumer = self.group_consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.wire(topic), partition as i32, Offset::Offset(next_offset as i64))
            .map_err(|e| kafka_err("commit", e))?;
        let result =
            blocking(move || consumer.commit(&tpl, CommitMode::Sync).map_err(|e| kafka_err("committing offsets", e)))
                .await;
        if result.is_err() {
            self.forget_group_consumer(group);
        }
        result
    }

    async fn committed_offset(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>> {
        self.check_partition(topic, partition)?;
        let consumer = self.group_consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.wire(topic), partition as i32);
        let timeout = self.settings.timeout;
        let committed = blocking(move || {
            consumer.committed_offsets(tpl, timeout).map_err(|e| kafka_err("reading committed offsets", e))
        })
        .await
        .inspect_err(|_| self.forget_group_consumer(group))?;
        Ok(committed.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(o as u64),
            _ => None,
        }))
    }
}

/// The consumer context of a group member: reports each new assignment.
struct MemberContext {
    topic: String,
    tx: tokio::sync::mpsc::UnboundedSender<Result<Vec<u32>>>,
}

impl rdkafka::client::ClientContext for MemberContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        CairnContext.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        CairnContext.error(error, reason)
    }
}

impl rdkafka::consumer::ConsumerContext for MemberContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        use rdkafka::consumer::Rebalance;
        let partitions = |tpl: &TopicPartitionList| -> Vec<u32> {
            let mut p: Vec<u32> =
                tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition() as u32).collect();
            p.sort_unstable();
            p
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "kafka group: could not pause the assigned partitions");
                }
                tracing::info!(partitions = ?partitions(tpl), "kafka group: partitions assigned");
                let _ = self.tx.send(Ok(partitions(tpl)));
            }
            Rebalance::Revoke(_) => {
                // Eager rebalancing revokes everything, then assigns anew.
                tracing::info!("kafka group: partitions revoked");
                let _ = self.tx.send(Ok(Vec::new()));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka group: rebalance error"),
        }
    }
}

/// Keeps this process a member of the group until the receiver is dropped.
fn membership(
    config: ClientConfig,
    topic: String,
    prefix: usize,
    tx: tokio::sync::mpsc::UnboundedSender<Result<Vec<u32>>>,
) {
    let context = MemberContext { topic: topic.clone(), tx: tx.clone() };
    let consumer: BaseConsumer<MemberContext> = match config.create_with_context(context) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(kafka_err("group member", e)));
            return;
        }
    };
    if let Err(e) = consumer.subscribe(&[&topic]) {
        let _ = tx.send(Err(kafka_err("joining the group", e)));
        return;
    }
    tracing::info!(topic = &topic[prefix..], "kafka group: joined");
    while !tx.is_closed() {
        // Records (there should be none: the partitions are paused) are dropped.
        let _ = consumer.poll(Duration::from_millis(200));
    }
    consumer.unsubscribe();
}

/// Up to `max` committed records of one partition from `from`, with a reader consumer. `high` is
/// the high watermark when the read began: the read goes on until it has passed it (records and
/// transaction markers), or, if a transaction is still open there, gives up waiting for it after
/// [`OPEN_TRANSACTION_WAIT`] and returns what is committed.
#[allow(clippy::too_many_arguments)]
fn read_with(
    consumer: &Reader,
    topic: &str,
    partition: u32,
    from: u64,
    high: u64,
    max: usize,
    prefix: usize,
    timeout: Duration,
) -> Result<Vec<Record>> {
    assign(consumer, topic, partition, from)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut first_end: Option<Instant> = None;
    while out.len() < max {
        match consumer.poll(Duration::from_millis(50)) {
            // A reused reader must not hand over anything left from its previous assignment.
            Some(Ok(m)) if m.topic() != topic || m.partition() != partition as i32 || (m.offset() as u64) < from => {}
            Some(Ok(m)) => {
                let r = to_record(&m, prefix);
                let last = r.offset + 1 >= high;
                out.push(r);
                if last {
                    break;
                }
            }
            // The end of what is committed. Past the high watermark: done. Before it: markers not
            // yet written, or a transaction still open; wait a little for them.
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition as i32 => {
                if position(consumer, topic, partition)?.is_some_and(|pos| pos >= high) {
                    break;
                }
                let since = *first_end.get_or_insert_with(Instant::now);
                if since.elapsed() > OPEN_TRANSACTION_WAIT {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => return Err(kafka_err("reading", e)),
            None if Instant::now() > deadline => {
                return Err(kafka_err("reading", "no answer from the broker in time"));
            }
            None => {
                if first_end.is_some_and(|t| t.elapsed() > OPEN_TRANSACTION_WAIT) {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// How long a `read` waits at the end of what is committed for records below the high watermark
/// (a transaction another process has not committed yet).
const OPEN_TRANSACTION_WAIT: Duration = Duration::from_millis(500);

/// Errors a tail cannot recover from. Others (broker restarts, leader changes, a partition briefly
/// unknown while metadata refreshes) are retried.
fn is_fatal(e: &KafkaError) -> bool {
    matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal))
}

fn assign<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: u32,
    from: u64,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64))
        .map_err(|e| kafka_err("assign", e))?;
    consumer.assign(&tpl).map_err(|e| kafka_err("assign", e))
}

fn position<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: u32,
) -> Result<Option<u64>> {
    let tpl = consumer.position().map_err(|e| kafka_err("position", e))?;
    Ok(tpl.find_partition(topic, partition as i32).and_then(|e| match e.offset() {
        Offset::Offset(o) if o >= 0 => Some(o as u64),
        _ => None,
    }))
}

/// A record as callers see it: `prefix` bytes of the topic name (the configured prefix) removed.
fn to_record(m: &impl Message, prefix: usize) -> Record {
    Record {
        topic: m.topic()[prefix..].to_owned(),
        partition: m.partition() as u32,
        offset: m.offset() as u64,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        key: m.key().unwrap_or_default().to_vec(),
        value: m.payload().unwrap_or_default().to_vec(),
        prev_hash: None,
        hash: None,
    }
}

/// Computes the hash chain over records read in order from the start of a partition: fills each
/// record's `prev_hash` and `hash` and returns the head. Kafka's offsets have gaps, so the chain links
/// committed records in offset order rather than by offset arithmetic.
pub fn chain_partition(head: &mut Option<Hash>, topic: &str, partition: u32, records: &mut [Record]) {
    for r in records {
        let prev = head.unwrap_or_else(|| cairn_log::chain::genesis(topic, partition));
        let hash = cairn_log::chain::link(&prev, &r.value);
        r.prev_hash = Some(prev);
        r.hash = Some(hash);
        *head = Some(hash);
    }
}
