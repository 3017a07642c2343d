//! The STS credential cache: one STS call per identity ([`StsRequest`]) and
//! cycle, shared by every connection that asks for the same thing, a failure
//! shared for a short while, and the rules that let a caller insist on
//! credentials from a call started after some moment (a revocation, a
//! `rotate` request) or drop ones S3 refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::sts::{AwsCredentials, CredentialSource, StsError, StsRequest, accept_credentials};
use crate::policy::schedule;

/// A cached STS answer and until when it is handed to further connections.
#[derive(Debug)]
struct Cached {
    credentials: Arc<AwsCredentials>,
    reuse_until: SystemTime,
    /// When the call that issued them started (tokio's clock): they were
    /// issued after anything that happened before then (a revocation).
    asked_at: tokio::time::Instant,
    /// S3 refused them although they had just been minted for a caller
    /// whose cached credentials S3 had refused: the refusal is about the
    /// role or the bucket, not the session's age, so they are not evicted
    /// again (see [`CredentialCache::evict`]).
    refused_fresh: bool,
}

/// What one request's slot holds: the last answer, or the last failure.
#[derive(Debug, Default)]
struct Slot {
    cached: Option<Cached>,
    failed: Option<Failed>,
}

/// A failed call, the answer to further callers until `until`.
#[derive(Debug)]
struct Failed {
    error: StsError,
    until: tokio::time::Instant,
    /// When the call started (tokio's clock): a caller that wants
    /// credentials from a call started after some moment
    /// ([`CredentialCache::issue`]'s `asked_after`) is not answered by a
    /// failure from before it.
    asked_at: tokio::time::Instant,
}

/// Credentials from [`CredentialCache::issue`], and whether this very call
/// asked STS for them.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The credentials.
    pub credentials: Arc<AwsCredentials>,
    /// `true`: minted by STS for this call; `false`: an answer cached for
    /// an earlier call (another connection's, or an earlier cycle's).
    pub minted: bool,
}

/// Shares STS answers between connections that ask for the same thing.
///
/// One call per [`StsRequest`] and cycle: the first connection due asks STS
/// (others asking meanwhile wait for that answer: single flight); the answer is
/// handed out until its own refresh point to every connection that does not
/// already hold it.
///
/// A failure is shared the same way, for `share_failure`: the connections
/// that waited for a call that failed get its error rather than each asking
/// STS again at once (a throttled STS would otherwise see one call per
/// connection in a row).
///
/// Cached credentials that S3 refuses (a revoked session) are dropped with
/// [`Self::evict`], so the next caller asks STS instead of being handed them
/// until their refresh point.
#[derive(Debug)]
pub struct CredentialCache {
    source: Arc<dyn CredentialSource>,
    slots: Mutex<HashMap<StsRequest, Arc<tokio::sync::Mutex<Slot>>>>,
    share_failure: Duration,
    /// The wall clock that reuse and expiry are judged by (tokio's, anchored,
    /// in tests on paused time).
    clock: crate::clock::Clock,
}

impl CredentialCache {
    /// An empty cache in front of `source`, whose failures answer further
    /// callers for `share_failure` (the daemon passes half of `retry_min`,
    /// so a connection's own retry, at least `retry_min` later, asks again).
    pub fn new(source: Arc<dyn CredentialSource>, share_failure: Duration) -> Self {
        Self {
            source,
            slots: Mutex::new(HashMap::new()),
            share_failure,
            clock: crate::clock::Clock::system(),
        }
    }

    /// The same cache judging time by `clock`.
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> Self {
        self.clock = clock;
        self
    }

    fn slot(&self, request: &StsRequest) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(request.clone()).or_default())
    }

    /// Credentials for `request` that the caller does not already hold
    /// (`held` = the access key id on the caller's connection).
    ///
    /// A cached answer is reused while `now` is before its refresh point
    /// (`expiration − refresh_before`, or half its life when it lives shorter);
    /// otherwise STS is called. A failure is the answer while it is shared
    /// (see the type's docs).
    pub async fn get(
        &self,
        request: &StsRequest,
        held: Option<&str>,
        refresh_before: Duration,
    ) -> Result<Arc<AwsCredentials>, StsError> {
        self.issue(request, held, refresh_before, None)
            .await
            .map(|issued| issued.credentials)
    }

    /// [`Self::get`], saying whether STS was asked for this call, and
    /// reusing a cached answer only if its call started at or after
    /// `asked_after` (`Some`: credentials issued after a moment, such as
    /// after S3 refused the ones before; `None`: any).
    pub async fn issue(
        &self,
        request: &StsRequest,
        held: Option<&str>,
        refresh_before: Duration,
        asked_after: Option<tokio::time::Instant>,
    ) -> Result<Issued, StsError> {
        if let Err(problem) = &request.attribution {
            return Err(StsError::Unsendable(problem.to_string()));
        }
        let slot = self.slot(request);
        let mut slot = slot.lock().await;
        let now = self.clock.now();
        if let Some(entry) = slot.cached.as_ref()
            && now < entry.reuse_until
            && held != Some(entry.credentials.access_key_id.as_str())
            && asked_after.is_none_or(|after| entry.asked_at >= after)
        {
            return Ok(Issued {
                credentials: Arc::clone(&entry.credentials),
                minted: false,
            });
        }
        // A connection whose credentials need replacing now asks anyway
        // (see `shaping::shared_until`).
        if let Some(failed) = &slot.failed
            && crate::clock::mono_now() < crate::remote::shaping::shared_until(failed.until)
            && asked_after.is_none_or(|after| failed.asked_at >= after)
        {
            return Err(StsError::Shared(Box::new(failed.error.clone())));
        }
        let asked_at = crate::clock::mono_now();
        let issued = match self.source.issue(request).await {
            Ok(credentials) => accept_credentials(credentials, request, self.clock.now()),
            Err(error) => Err(error),
        };
        let credentials = match issued {
            Ok(credentials) => Arc::new(credentials),
            Err(error) => {
                let now = crate::clock::mono_now();
                slot.failed = Some(Failed {
                    error: error.clone(),
                    until: now.checked_add(self.share_failure).unwrap_or(now),
                    asked_at,
                });
                return Err(error);
            }
        };
        slot.failed = None;
        let fetched = self.clock.now();
        let reuse_until = schedule::next_rotation(
            fetched,
            credentials.expiration,
            refresh_before,
            Duration::ZERO,
            0.0,
        )
        .at;
        slot.cached = Some(Cached {
            credentials: Arc::clone(&credentials),
            reuse_until,
            asked_at,
            refused_fresh: false,
        });
        Ok(Issued {
            credentials,
            minted: true,
        })
    }

    /// Drops the cached answer for `request` after S3 refused it, so the
    /// next caller asks STS: but only if the slot still holds the refused
    /// `access_key_id` (a newer answer another caller got meanwhile stays:
    /// no ABA). `false` when those credentials were refused when fresh
    /// ([`Self::refused_fresh`]): the refusal is about permissions, they
    /// stay, and asking STS again would only cost one call per connection
    /// (a caller that must have newer ones passes `asked_after` to
    /// [`Self::issue`]). `true`: asking again may help.
    pub async fn evict(&self, request: &StsRequest, access_key_id: &str) -> bool {
        let slot = self.slot(request);
        let mut slot = slot.lock().await;
        match &slot.cached {
            Some(entry) if entry.credentials.access_key_id == access_key_id => {
                if entry.refused_fresh {
                    return false;
                }
                slot.cached = None;
                true
            }
            _ => true,
        }
    }

    /// Whether [`Self::evict`] would let go of `access_key_id` now (it is
    /// not marked [`Self::refused_fresh`]).
    pub async fn is_evictable(&self, request: &StsRequest, access_key_id: &str) -> bool {
        let slot = self.slot(request);
        let slot = slot.lock().await;
        !slot.cached.as_ref().is_some_and(|entry| {
            entry.credentials.access_key_id == access_key_id && entry.refused_fresh
        })
    }

    /// Marks the cached answer for `request` as refused by S3 although just
    /// minted (if the slot still holds `access_key_id`): [`Self::evict`]
    /// leaves it alone from now on.
    pub async fn refused_fresh(&self, request: &StsRequest, access_key_id: &str) {
        let slot = self.slot(request);
        let mut slot = slot.lock().await;
        if let Some(entry) = slot.cached.as_mut()
            && entry.credentials.access_key_id == access_key_id
        {
            entry.refused_fresh = true;
        }
    }

    /// Forgets cached answers for requests no connection uses any more.
    pub fn retain(&self, in_use: &std::collections::HashSet<StsRequest>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|request, _| in_use.contains(request));
    }
}
