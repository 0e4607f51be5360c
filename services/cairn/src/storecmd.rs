//! `cairn store digest` and `cairn migrate`.

use crate::config::{self, StoreBackend};
use crate::datadir::DataDir;
use crate::{StoreArgs, backends, telemetry};
use anyhow::bail;
use std::process::ExitCode;

pub fn digest(args: StoreArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let backends = config::backends(&args.common)?;
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    if matches!(backends.store, StoreBackend::Embedded) {
        let path = data.store_dir().join("resources.redb");
        if !path.exists() {
            bail!("projection store {}: does not exist (start the server once to build it)", path.display());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let digest = rt.block_on(async {
        let store = backends::open_store(&backends, &data, 64 << 20, backends::OtherLayout::Refuse).await?.store;
        anyhow::Ok(store.digest().await?)
    })?;
    println!("{digest}");
    Ok(ExitCode::SUCCESS)
}

pub fn migrate(args: StoreArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let backends = config::backends(&args.common)?;
    let StoreBackend::Scylla(settings) = &backends.store else {
        println!("the embedded store needs no migration (it is created at start); nothing to do");
        return Ok(ExitCode::SUCCESS);
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let applied = rt.block_on(cairn_store_scylla::migrate(settings))?;
    if applied.is_empty() {
        println!("keyspace {} on {}: schema up to date", settings.keyspace, settings.nodes);
    } else {
        println!("keyspace {} on {}: applied {}", settings.keyspace, settings.nodes, applied.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
