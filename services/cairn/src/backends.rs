//! Opening the configured event log and projection store: the one place that knows every backend.

use crate::config::{Backends, LogBackend, StoreBackend};
use crate::datadir::DataDir;
use anyhow::Context;
use cairn_log::EventLog;
use cairn_log::embedded::{EmbeddedLog, EmbeddedOptions};
use cairn_log_kafka::KafkaLog;
use cairn_store::ResourceStore;
use cairn_store::embedded::EmbeddedStore;
use cairn_store_scylla::ScyllaStore;
use std::sync::Arc;

/// An open event log, whichever backend.
#[derive(Clone)]
pub enum OpenLog {
    Embedded(Arc<EmbeddedLog>),
    Kafka(Arc<KafkaLog>),
}

impl OpenLog {
    pub fn as_dyn(&self) -> Arc<dyn EventLog> {
        match self {
            OpenLog::Embedded(l) => l.clone(),
            OpenLog::Kafka(l) => l.clone(),
        }
    }

    /// Why the log refuses appends, if it does (for `/readyz`).
    pub fn failure(&self) -> Option<String> {
        match self {
            OpenLog::Embedded(l) => l.failure(),
            OpenLog::Kafka(l) => l.failure(),
        }
    }

    /// A one-line description for logs and `/readyz`.
    pub fn describe(&self) -> String {
        match self {
            OpenLog::Embedded(_) => "embedded".into(),
            OpenLog::Kafka(l) => format!("kafka {}", l.settings().brokers),
        }
    }

    pub fn close(&self) {
        if let OpenLog::Embedded(l) = self {
            l.close();
        }
    }
}

/// Opens the log. The embedded log lives in `data`; `read_only` opens it beside a running server.
pub async fn open_log(backends: &Backends, data: &DataDir, options: EmbeddedOptions) -> anyhow::Result<OpenLog> {
    match &backends.log {
        LogBackend::Embedded => {
            let log = EmbeddedLog::open(data.log_dir(), options)?;
            if let Some((segment, position, len, reason)) = &log.open_report().torn_tail {
                tracing::warn!(
                    segment = %segment.display(), position, len, %reason,
                    "cut off a torn, never-acknowledged tail of the log (kept in log/quarantine/)"
                );
            }
            Ok(OpenLog::Embedded(Arc::new(log)))
        }
        LogBackend::Kafka(settings) => {
            let mut settings = settings.clone();
            settings.read_only = options.read_only;
            let log = KafkaLog::connect(settings.clone())
                .await
                .with_context(|| format!("event log on Kafka at {}", settings.brokers))?;
            Ok(OpenLog::Kafka(Arc::new(log)))
        }
    }
}

/// How [`open_store`] treats an embedded store file of another layout (decision 0010).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OtherLayout {
    /// Delete it and start again empty: the server's projectors rebuild it from the log.
    Rebuild,
    /// Refuse it: a command that only reads the store must not throw it away.
    Refuse,
}

/// An open projection store, and when it is an embedded store that starts a rebuild from the log
/// ([`EmbeddedStore::rebuilding`]), that store, whose indexes must be built before anything reads it.
pub struct OpenStore {
    pub store: Arc<dyn ResourceStore>,
    pub rebuilding: Option<Arc<EmbeddedStore>>,
}

/// Opens the projection store (the embedded one in `data`, with a page cache of `cache_bytes`).
pub async fn open_store(
    backends: &Backends,
    data: &DataDir,
    cache_bytes: usize,
    other_layout: OtherLayout,
) -> anyhow::Result<OpenStore> {
    Ok(match &backends.store {
        StoreBackend::Embedded => {
            let path = data.store_dir().join("resources.redb");
            let store = Arc::new(match other_layout {
                OtherLayout::Rebuild => EmbeddedStore::open_or_rebuild(path, cache_bytes)?,
                OtherLayout::Refuse => EmbeddedStore::open_with_cache(path, cache_bytes)?,
            });
            let rebuilding = store.rebuilding().then(|| store.clone());
            OpenStore { store, rebuilding }
        }
        StoreBackend::Scylla(settings) => OpenStore {
            store: Arc::new(
                ScyllaStore::connect(settings)
                    .await
                    .with_context(|| format!("projection store on CQL at {}", settings.nodes))?,
            ),
            rebuilding: None,
        },
    })
}
