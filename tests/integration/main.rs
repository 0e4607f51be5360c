//! One integration-test binary for the whole workspace (one link, one process per run); each module
//! covers one area.

mod audit;
mod auth;
mod browser;
mod cli;
mod distributed;
mod fhir;
mod log_backends;
mod replay;
mod store_backends;
