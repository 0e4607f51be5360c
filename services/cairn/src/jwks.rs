//! Fetching client key sets from their `jwks_uri` over HTTP, for `cairn_auth`'s private_key_jwt
//! checks. No redirects, a short timeout and a size cap: the URL is the client's, not ours.

use cairn_auth::jwks::JwksFetcher;
use serde_json::Value;
use std::time::Duration;

const MAX_JWKS_BYTES: usize = 64 * 1024;

pub struct HttpJwksFetcher {
    client: reqwest::Client,
}

impl HttpJwksFetcher {
    pub fn new() -> anyhow::Result<HttpJwksFetcher> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(HttpJwksFetcher { client })
    }
}

/// `max-age` from a Cache-Control header (`no-store`/`no-cache` count as 0).
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').map(str::trim).find_map(|d| match d {
        "no-store" | "no-cache" => Some(Duration::ZERO),
        _ => d.strip_prefix("max-age=").and_then(|s| s.parse().ok()).map(Duration::from_secs),
    })
}

#[async_trait::async_trait]
impl JwksFetcher for HttpJwksFetcher {
    async fn fetch(&self, uri: &str) -> Result<(Value, Option<Duration>), String> {
        let resp = self.client.get(uri).send().await.map_err(|e| format!("{uri}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{uri}: HTTP {}", resp.status()));
        }
        let ttl = resp.headers().get("cache-control").and_then(|v| v.to_str().ok()).and_then(max_age);
        if resp.content_length().is_some_and(|n| n as usize > MAX_JWKS_BYTES) {
            return Err(format!("{uri}: the key set is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let bytes = resp.bytes().await.map_err(|e| format!("{uri}: {e}"))?;
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!("{uri}: the key set is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let set = serde_json::from_slice(&bytes).map_err(|e| format!("{uri}: not JSON: {e}"))?;
        Ok((set, ttl))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cache_control_max_age() {
        assert_eq!(super::max_age("public, max-age=600"), Some(std::time::Duration::from_secs(600)));
        assert_eq!(super::max_age("no-store"), Some(std::time::Duration::ZERO));
        assert_eq!(super::max_age("public"), None);
    }
}
