//! Client key sets fetched from a `jwks_uri` (SMART Backend Services lets a client publish its keys
//! at a URL, so it can rotate them without re-registering).
//!
//! Fetching is HTTP, which this crate does not speak: the edge gives a [`JwksFetcher`]. Sets are
//! cached for the `max-age` the client's server sends (clamped to 1 minute .. 1 day; 5 minutes
//! without one); an assertion naming a `kid` the cached set lacks refetches at most every 10 seconds.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Gets a JWK Set over HTTP: the set and how long it may be cached.
#[async_trait::async_trait]
pub trait JwksFetcher: Send + Sync {
    async fn fetch(&self, uri: &str) -> Result<(Value, Option<Duration>), String>;
}

const DEFAULT_TTL: Duration = Duration::from_secs(300);
const MIN_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(86_400);
const REFETCH_AFTER: Duration = Duration::from_secs(10);

struct Cached {
    set: Value,
    fetched: Instant,
    ttl: Duration,
}

#[derive(Default)]
pub struct JwksCache {
    sets: Mutex<HashMap<String, Cached>>,
}

impl JwksCache {
    /// The client's key set, fetched if absent, stale, or (not too often) lacking `kid`.
    pub async fn get(&self, fetcher: &dyn JwksFetcher, uri: &str, kid: Option<&str>) -> Result<Value, String> {
        {
            let sets = self.sets.lock().expect("jwks cache");
            if let Some(c) = sets.get(uri) {
                let fresh = c.fetched.elapsed() < c.ttl;
                let has_kid =
                    kid.is_none_or(|k| c.set["keys"].as_array().is_some_and(|ks| ks.iter().any(|j| j["kid"] == k)));
                if fresh && (has_kid || c.fetched.elapsed() < REFETCH_AFTER) {
                    return Ok(c.set.clone());
                }
            }
        }
        let (set, max_age) = fetcher.fetch(uri).await?;
        if !set["keys"].is_array() {
            return Err(format!("{uri} did not return a JWK Set"));
        }
        let ttl = max_age.unwrap_or(DEFAULT_TTL).clamp(MIN_TTL, MAX_TTL);
        self.sets
            .lock()
            .expect("jwks cache")
            .insert(uri.to_owned(), Cached { set: set.clone(), fetched: Instant::now(), ttl });
        Ok(set)
    }
}
