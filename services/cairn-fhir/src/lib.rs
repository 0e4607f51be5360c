//! FHIR R4 domain logic for the resources Cairn owns: validation, ids and meta, search parameters
//! and matching, Bundles, the CapabilityStatement. Knows nothing of HTTP, Kafka, CQL or storage.

pub mod index;
pub mod outcome;
pub mod resource;
pub mod search;
