//! One integration-test binary for the whole workspace (one link, one process per run); each module
//! covers one area.

mod audit;
mod auth;
mod browser;
mod cli;
mod distributed;
mod federation;
mod fhir;
mod log_backends;
mod mock_op;
mod replay;
mod store_backends;
