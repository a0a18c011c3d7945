//! Rate limits: per principal (key id or JWT subject) and, for the public tier, per client
//! address. In memory with governor's GCRA; with `redis_url`, a sliding window in Redis that
//! every instance shares (a Lua script: one round trip, atomic, on Redis's clock). When Redis
//! cannot be reached the limits are counted here instead — never open, never an outage — and
//! that is reported (metric, `/readyz` details, one log line per change).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics::{counter, gauge};

use super::config::RateLimit;
use crate::telemetry::{RATE_LIMIT_FALLBACK, RATE_LIMIT_REDIS_ERRORS};

/// A Redis call that takes longer than this counts locally instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// How often a lost Redis is tried again.
const REDIS_RETRY: Duration = Duration::from_secs(2);

/// The sliding window: drop what left it, count, admit if below the limit. Returns 0 when
/// admitted, else the milliseconds until the oldest entry leaves the window.
const SLIDING_WINDOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
";

/// Past the limit: when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

/// Which backend counts right now, for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimiterStatus {
    pub backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

pub struct Limiter {
    local: HashMap<RateLimit, DefaultKeyedRateLimiter<Arc<str>>>,
    redis: Option<RedisLimiter>,
}

struct RedisLimiter {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    script: redis::Script,
    /// The URL without its password, for messages.
    display: String,
    healthy: AtomicBool,
    last_attempt: Mutex<Option<Instant>>,
    problem: Mutex<Option<String>>,
    /// Makes each window entry unique across the instance's requests.
    sequence: AtomicU64,
    instance: u64,
}

impl Limiter {
    /// `quotas`: every limit any principal can have. `redis_url`: share them.
    pub fn new(
        quotas: impl IntoIterator<Item = RateLimit>,
        redis_url: Option<&str>,
    ) -> Result<Limiter, String> {
        let mut local = HashMap::new();
        for limit in quotas {
            local
                .entry(limit)
                .or_insert_with(|| RateLimiter::keyed(quota(limit)));
        }
        let redis = match redis_url {
            Some(url) => {
                let client = redis::Client::open(url)
                    .map_err(|e| format!("redis_url: {}", redact(&e.to_string(), url)))?;
                Some(RedisLimiter {
                    client,
                    connection: tokio::sync::Mutex::new(None),
                    script: redis::Script::new(SLIDING_WINDOW),
                    display: redact_url(url),
                    healthy: AtomicBool::new(true),
                    last_attempt: Mutex::new(None),
                    problem: Mutex::new(None),
                    sequence: AtomicU64::new(0),
                    instance: fastrand::u64(..),
                })
            }
            None => None,
        };
        Ok(Limiter { local, redis })
    }

    /// Counts one request of `key` against `limit`.
    pub async fn check(&self, key: &Arc<str>, limit: RateLimit) -> Result<(), Limited> {
        if let Some(redis) = &self.redis {
            match redis.check(key, limit).await {
                Ok(verdict) => return verdict,
                Err(problem) => redis.failed(problem),
            }
        }
        self.check_locally(key, limit)
    }

    fn check_locally(&self, key: &Arc<str>, limit: RateLimit) -> Result<(), Limited> {
        let Some(limiter) = self.local.get(&limit) else {
            // Every limit is registered at start; one that is not cannot be enforced.
            return Ok(());
        };
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| Limited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Forgets idle keys (the public tier's client addresses) so memory stays bounded.
    pub fn retain_recent(&self) {
        for limiter in self.local.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    pub fn status(&self) -> LimiterStatus {
        match &self.redis {
            None => LimiterStatus {
                backend: "local",
                problem: None,
            },
            Some(r) if r.healthy.load(Ordering::Relaxed) => LimiterStatus {
                backend: "redis",
                problem: None,
            },
            Some(r) => LimiterStatus {
                backend: "local",
                problem: r.problem.lock().ok().and_then(|p| p.clone()),
            },
        }
    }
}

impl RedisLimiter {
    async fn check(&self, key: &str, limit: RateLimit) -> Result<Result<(), Limited>, String> {
        let mut connection = self.connection().await?;
        let member = format!(
            "{:x}-{}",
            self.instance,
            self.sequence.fetch_add(1, Ordering::Relaxed)
        );
        let mut invocation = self.script.key(format!("stepflow:rl:{}:{key}", limit));
        invocation
            .arg(limit.per.as_millis() as u64)
            .arg(limit.count)
            .arg(member);
        let wait_ms: u64 =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| format!("no answer within {} ms", REDIS_TIMEOUT.as_millis()))?
                .map_err(|e| redact(&e.to_string(), &self.display))?;
        self.recovered();
        Ok(if wait_ms == 0 {
            Ok(())
        } else {
            Err(Limited {
                retry_after: Duration::from_millis(wait_ms),
            })
        })
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, String> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        {
            let mut last = self
                .last_attempt
                .lock()
                .map_err(|_| "poisoned".to_owned())?;
            if last.is_some_and(|t| t.elapsed() < REDIS_RETRY) {
                return Err(self
                    .problem
                    .lock()
                    .ok()
                    .and_then(|p| p.clone())
                    .unwrap_or_else(|| "not connected".into()));
            }
            *last = Some(Instant::now());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            REDIS_TIMEOUT * 2,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| redact(&e.to_string(), &self.display))?;
        *slot = Some(manager.clone());
        Ok(manager)
    }

    fn failed(&self, problem: String) {
        counter!(RATE_LIMIT_REDIS_ERRORS).increment(1);
        if let Ok(mut p) = self.problem.lock() {
            *p = Some(format!("redis {}: {problem}", self.display));
        }
        if self.healthy.swap(false, Ordering::Relaxed) {
            gauge!(RATE_LIMIT_FALLBACK).set(1.0);
            tracing::warn!(redis = %self.display, error = %problem, "rate limits counted locally: Redis is unreachable");
        }
    }

    fn recovered(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            gauge!(RATE_LIMIT_FALLBACK).set(0.0);
            if let Ok(mut p) = self.problem.lock() {
                *p = None;
            }
            tracing::info!(redis = %self.display, "rate limits counted in Redis again");
        }
    }
}

fn quota(limit: RateLimit) -> Quota {
    let count = NonZeroU32::new(limit.count).unwrap_or(NonZeroU32::MIN);
    // A full budget at once, refilled evenly: `count` per `per`.
    Quota::with_period(limit.per / limit.count)
        .unwrap_or_else(|| Quota::per_second(count))
        .allow_burst(count)
}

/// `redis://user:secret@host` → `redis://user:***@host`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// An error message with any password of `url` removed.
fn redact(message: &str, url: &str) -> String {
    let secret = url
        .find("://")
        .and_then(|s| url.rfind('@').filter(|&a| a > s).map(|a| &url[s + 3..a]))
        .and_then(|userinfo| userinfo.split_once(':').map(|(_, p)| p))
        .filter(|p| !p.is_empty() && *p != "***");
    match secret {
        Some(p) => message.replace(p, "***"),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_limiter_admits_the_budget_then_says_when() {
        let limit = RateLimit::parse("5/min").unwrap();
        let limiter = Limiter::new([limit], None).unwrap();
        let (k, other): (Arc<str>, Arc<str>) = ("k".into(), "other".into());
        for _ in 0..5 {
            assert!(limiter.check(&k, limit).await.is_ok());
        }
        let limited = limiter.check(&k, limit).await.unwrap_err();
        assert!(limited.retry_after > Duration::from_secs(5), "{limited:?}");
        assert!(
            limited.retry_after <= Duration::from_secs(12),
            "{limited:?}"
        );
        // Another principal has its own budget.
        assert!(limiter.check(&other, limit).await.is_ok());
    }

    #[test]
    fn passwords_are_kept_out_of_messages() {
        assert_eq!(
            redact_url("redis://default:s3cret@10.0.0.1:6379/0"),
            "redis://default:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact("auth failed for s3cret", "redis://u:s3cret@h"),
            "auth failed for ***"
        );
    }
}
