//! `cairn store digest`.

use crate::datadir::DataDir;
use crate::{StoreArgs, config, telemetry};
use anyhow::bail;
use cairn_store::ResourceStore;
use cairn_store::embedded::EmbeddedStore;
use std::process::ExitCode;

pub fn digest(args: StoreArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    let path = data.store_dir().join("resources.redb");
    if !path.exists() {
        bail!("projection store {}: does not exist (start the server once to build it)", path.display());
    }
    let store = EmbeddedStore::open(&path)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    println!("{}", rt.block_on(store.digest())?);
    Ok(ExitCode::SUCCESS)
}
