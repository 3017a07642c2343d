//! One rotation of one connection: IMS token → (GET for the etag and the S3
//! target when they are not known) → STS credentials → pre-push S3 check
//! with the new credentials ([`crate::remote::s3probe`]; not pushed unless it passes)
//! → PATCH with `If-Match`; a 412 re-reads the
//! connection and PATCHes again at once (bounded), a 401 fetches a new IMS
//! token and retries once. Retry *timing* is not decided here: the job reports
//! an outcome and the scheduler plans the next attempt.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::observe::telemetry::Telemetry;
use crate::policy::schedule::RetryKind;
use crate::remote::flow::{FlowClient, FlowError, RemoteConnection};
use crate::remote::ims::{AccessToken, ImsClient, ImsError};
use crate::remote::s3probe::{ProbeError, S3Probe, S3Target};
use crate::remote::sts::{AwsCredentials, CredentialCache, StsError, StsRequest};

mod seams;
pub use seams::{FlowApi, TokenSource};

/// How many 412s in a row one job absorbs (re-GET + PATCH at once) before it
/// reports a failure and backs off: a writer that changes the connection this
/// often is a fight, and a short pause lets it finish.
pub const MAX_CONFLICTS_PER_JOB: u32 = 5;

/// Everything one job needs. Cheap to share: `Arc<Rotator>`.
#[derive(Debug)]
pub struct Rotator {
    /// Flow Service client.
    pub flow: FlowClient,
    /// IMS token cache.
    pub ims: Arc<ImsClient>,
    /// STS answer cache.
    pub credentials: Arc<CredentialCache>,
    /// Counters.
    pub telemetry: Arc<Telemetry>,
    /// `[rotation] refresh_before`, for the credential cache.
    pub refresh_before: Duration,
    /// `[rotation] verify`.
    pub verify: bool,
    /// `--dry-run`: everything but the PATCH.
    pub dry_run: bool,
    /// `[rotation] prepush_check`: the S3 check run before each PATCH
    /// (`None` = off).
    pub prepush: Option<Arc<dyn S3Probe>>,
    /// With `[coordination]`: checked before every `GET` and `PATCH`
    /// (`None` = this process is the only writer).
    pub fence: Option<crate::coordination::Fence>,
}

/// What to do for one connection.
#[derive(Debug, Clone)]
pub struct Job {
    /// Connection id.
    pub id: String,
    /// Sandbox name.
    pub sandbox: String,
    /// Which credentials it gets (shared with the connection).
    pub sts: Arc<StsRequest>,
    /// The etag from our last PATCH, if known: saves the GET.
    pub known_etag: Option<String>,
    /// The access key id this daemon last put on the connection.
    pub held: Option<String>,
    /// After a restart: only rotate if the connection's etag is not this one
    /// (someone edited it) — otherwise report [`JobResult::Unchanged`].
    pub resume_if_etag: Option<String>,
    /// The connection's S3 parameters, learnt with the etag; when unknown
    /// (and the pre-push check is on) the job GETs the connection.
    pub s3: Option<S3Target>,
    /// Only credentials from an STS call started at or after this moment
    /// (tokio's clock): set when the credentials on the connection were
    /// found refused then, so nothing issued before (a revoked session)
    /// is pushed. `None`: the STS cache decides.
    pub fresh_after: Option<tokio::time::Instant>,
}

/// The health check's word on one connection, for the scheduler: the
/// answer of its test, and whether to rotate it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tested {
    /// Connection id.
    pub id: String,
    /// Whether Flow Service reached S3 with the credentials on it.
    pub passed: bool,
    /// Rotate now, with credentials from an STS call started at or after
    /// this moment (the ones on it were refused then); `None`: no rotation.
    pub rotate_after: Option<tokio::time::Instant>,
}

/// The S3 error codes that refuse a *session* (revoked, expired, unknown
/// or mangled credentials) rather than a missing permission alone: after
/// one of them, cached credentials are dropped and new ones asked for.
/// `AccessDenied` is among them: it is what S3 answers to a session
/// revoked by "revoke active sessions" (an explicit deny on older tokens).
pub const SESSION_REFUSALS: [&str; 4] = [
    "AccessDenied",
    "InvalidAccessKeyId",
    "ExpiredToken",
    "InvalidToken",
];

/// How a job ended.
#[derive(Debug)]
pub enum JobResult {
    /// New credentials are on the connection.
    Rotated {
        /// Of the new credentials.
        access_key_id: String,
        /// Of the new credentials.
        expires_at: SystemTime,
        /// The connection's new etag, if the answer carried it.
        etag: Option<String>,
        /// 412s absorbed on the way.
        conflicts: u32,
        /// The connection's S3 parameters, if known.
        s3: Option<S3Target>,
        /// `[rotation] verify`: whether Flow Service's connection test
        /// passed (`None`: not asked, or it could not run).
        verified: Option<bool>,
    },
    /// `--dry-run`: these would have been pushed.
    WouldRotate {
        /// Of the credentials that would be pushed.
        access_key_id: String,
        /// Of the credentials that would be pushed.
        expires_at: SystemTime,
        /// The etag the PATCH would have carried.
        etag: String,
        /// The connection's S3 parameters, if known.
        s3: Option<S3Target>,
    },
    /// Resumed after a restart: the connection is as we left it.
    Unchanged {
        /// Its etag, unchanged.
        etag: String,
        /// The connection's S3 parameters, if known.
        s3: Option<S3Target>,
    },
    /// The attempt failed.
    Failed {
        /// Why.
        error: RotationError,
        /// The etag the job ends with: learnt from a GET (a GET is then saved
        /// next time), or `None` when it is unknown, stale (412) or was
        /// malformed or refused; the scheduler then forgets its cached one.
        etag: Option<String>,
        /// 412s absorbed on the way.
        conflicts: u32,
        /// The connection's S3 parameters, if the job learnt them.
        s3: Option<S3Target>,
    },
}

impl JobResult {
    /// The connection's S3 parameters as the job knew them at its end: the
    /// scheduler keeps them with the etag for the next job.
    pub fn s3_target(&self) -> Option<&S3Target> {
        match self {
            Self::Rotated { s3, .. }
            | Self::WouldRotate { s3, .. }
            | Self::Unchanged { s3, .. }
            | Self::Failed { s3, .. } => s3.as_ref(),
        }
    }
}

/// Why a rotation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RotationError {
    /// From STS.
    #[error(transparent)]
    Sts(#[from] StsError),
    /// From IMS.
    #[error(transparent)]
    Ims(#[from] ImsError),
    /// From Flow Service.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// Too many 412s in a row.
    #[error("the connection kept changing under us ({0} etag conflicts in a row)")]
    Conflicts(u32),
    /// Shutdown began before the PATCH was sent.
    #[error("cancelled by shutdown")]
    Cancelled,
    /// The job's task ended without a result (a panic: a bug). Backed off
    /// like transient trouble; the connection keeps its state.
    #[error("internal error in the rotation job: {0}")]
    Internal(String),
    /// The pre-push S3 check did not prove that the new credentials can list
    /// the connection's bucket: nothing was pushed. A denial waits for the
    /// slow cadence, a transient failure backs off.
    #[error("new credentials not pushed: {0}")]
    Prepush(ProbeError),
    /// This replica lost the coordination lease: it stopped before the next
    /// request (after a 412 it does not re-read: the new leader owns the
    /// connection). Not a failure of the connection.
    #[error("stopped: this replica is no longer the leader")]
    NotLeader,
}

impl RotationError {
    /// The kind of wait before the next attempt.
    pub fn retry_kind(&self) -> RetryKind {
        match self {
            Self::Sts(e) if e.is_transient() => RetryKind::Backoff,
            Self::Ims(e) if e.is_transient() => RetryKind::Backoff,
            Self::Sts(_) | Self::Ims(_) => RetryKind::Slow,
            Self::Flow(FlowError::Throttled {
                retry_after: Some(wait),
                ..
            }) => RetryKind::After(*wait),
            Self::Flow(FlowError::Rejected { .. } | FlowError::Unsuitable(_)) => RetryKind::Slow,
            Self::Prepush(e) if e.is_transient() => RetryKind::Backoff,
            Self::Prepush(_) => RetryKind::Slow,
            Self::Flow(_)
            | Self::Conflicts(_)
            | Self::Cancelled
            | Self::Internal(_)
            | Self::NotLeader => RetryKind::Backoff,
        }
    }

    /// True when this job made no request for this error: it was given the
    /// failure of a request that is logged once (IMS down or refusing, an
    /// STS call for the same identity failing), so the connection's own
    /// line is `debug`.
    pub fn is_shared(&self) -> bool {
        match self {
            Self::Ims(e) => e.is_shared(),
            Self::Sts(e) => e.is_shared(),
            _ => false,
        }
    }

    /// The HTTP status or remote error code, for the `status` log field.
    pub fn status(&self) -> Option<String> {
        match self {
            Self::Flow(
                FlowError::Throttled { status, .. } | FlowError::Rejected { status, .. },
            ) => Some(status.to_string()),
            Self::Flow(FlowError::Unauthorized(_)) => Some("401".to_owned()),
            Self::Flow(FlowError::PreconditionFailed) | Self::Conflicts(_) => {
                Some("412".to_owned())
            }
            Self::Ims(e) => match e.cause() {
                ImsError::Rejected { status, .. } => Some(status.to_string()),
                _ => None,
            },
            Self::Sts(e) => match e.cause() {
                StsError::Rejected { code, .. } => Some(code.clone()),
                _ => None,
            },
            Self::Prepush(e) => e.code().map(str::to_owned),
            _ => None,
        }
    }
}

/// Whether the pre-push check refused the credentials themselves (see
/// [`SESSION_REFUSALS`]).
fn refuses_the_session(error: &ProbeError) -> bool {
    error
        .code()
        .is_some_and(|code| SESSION_REFUSALS.contains(&code))
}

/// What runs one job: the seam between the scheduler and the remotes.
/// [`Rotator`] talks to IMS, STS and Flow Service; tests of the scheduler
/// plug in a scripted runner and need no sockets.
pub trait JobRunner: Send + Sync + std::fmt::Debug + 'static {
    /// Runs one job to its end. Stops before the PATCH once `cancel` fires.
    fn run<'a>(
        &'a self,
        job: &'a Job,
        cancel: &'a CancellationToken,
    ) -> futures::future::BoxFuture<'a, JobResult>;

    /// The connections' STS requests after a reload: cached answers for
    /// requests no longer in use may be dropped.
    fn retain(&self, _in_use: &std::collections::HashSet<StsRequest>) {}
}

impl JobRunner for Rotator {
    fn run<'a>(
        &'a self,
        job: &'a Job,
        cancel: &'a CancellationToken,
    ) -> futures::future::BoxFuture<'a, JobResult> {
        Box::pin(Rotator::run(self, job, cancel))
    }

    fn retain(&self, in_use: &std::collections::HashSet<StsRequest>) {
        self.credentials.retain(in_use);
    }
}

/// One job's view of what it works with: the remotes behind their traits,
/// the settings. Borrowed from a [`Rotator`] for the job's length.
struct Rotation<'a> {
    flow: &'a dyn FlowApi,
    ims: &'a dyn TokenSource,
    credentials: &'a CredentialCache,
    prepush: Option<&'a dyn S3Probe>,
    fence: Option<&'a crate::coordination::Fence>,
    telemetry: &'a Telemetry,
    refresh_before: Duration,
    verify: bool,
    dry_run: bool,
}

/// The job's working state: what it learnt survives a failure.
struct Progress {
    etag: Option<String>,
    /// The connection's S3 parameters as last read.
    s3: Option<S3Target>,
    /// The target the pre-push check passed for (re-checked when a re-GET
    /// after a 412 finds another one).
    checked: Option<S3Target>,
    /// Whether `s3` was read during this job (not cached from an earlier one).
    target_read: bool,
    conflicts: u32,
    token: Option<Arc<AccessToken>>,
    token_refreshed: bool,
}

impl Rotator {
    /// Runs one job to its end. Stops before the PATCH once `cancel` fires;
    /// a PATCH already sent is let finish.
    pub async fn run(&self, job: &Job, cancel: &CancellationToken) -> JobResult {
        let rotation = Rotation {
            flow: &self.flow,
            ims: &*self.ims,
            credentials: &self.credentials,
            prepush: self.prepush.as_deref(),
            fence: self.fence.as_ref(),
            telemetry: &self.telemetry,
            refresh_before: self.refresh_before,
            verify: self.verify,
            dry_run: self.dry_run,
        };
        rotation.run(job, cancel).await
    }
}

impl Rotation<'_> {
    /// See [`Rotator::run`].
    async fn run(&self, job: &Job, cancel: &CancellationToken) -> JobResult {
        let mut progress = Progress {
            // A cached etag that cannot be sent (a corrupt state file, an
            // older version that kept anything) is dropped: the job re-reads.
            etag: job
                .known_etag
                .clone()
                .filter(|etag| crate::ident::is_valid_etag(etag)),
            s3: job.s3.clone(),
            checked: None,
            target_read: false,
            conflicts: 0,
            token: None,
            token_refreshed: false,
        };
        match self.attempt(job, &mut progress, cancel).await {
            Ok(result) => result,
            Err(error) => JobResult::Failed {
                error,
                etag: progress.etag,
                conflicts: progress.conflicts,
                s3: progress.s3,
            },
        }
    }

    async fn attempt(
        &self,
        job: &Job,
        progress: &mut Progress,
        cancel: &CancellationToken,
    ) -> Result<JobResult, RotationError> {
        self.fenced()?;
        // The check needs the bucket: without a cached target, GET anyway.
        let need_target = self.prepush.is_some() && progress.s3.is_none();
        if job.resume_if_etag.is_some() || progress.etag.is_none() || need_target {
            let remote = self.read(job, progress).await?;
            if job.resume_if_etag.as_deref() == Some(remote.etag.as_str()) {
                return Ok(JobResult::Unchanged {
                    etag: remote.etag,
                    s3: progress.s3.clone(),
                });
            }
            progress.etag = Some(remote.etag);
        }
        let credentials = self.checked_credentials(job, progress, cancel).await?;
        if self.dry_run {
            return Ok(JobResult::WouldRotate {
                access_key_id: credentials.access_key_id.clone(),
                expires_at: credentials.expiration,
                etag: progress.etag.clone().unwrap_or_default(),
                s3: progress.s3.clone(),
            });
        }
        loop {
            if cancel.is_cancelled() {
                return Err(RotationError::Cancelled);
            }
            // Before every PATCH, and before the re-read after a 412: a
            // replica that lost the lease stops here.
            self.fenced()?;
            let Some(etag) = progress.etag.clone() else {
                let remote = self.read(job, progress).await?;
                progress.etag = Some(remote.etag);
                continue;
            };
            // A re-GET after a 412 may show another bucket or folder.
            if progress.checked != progress.s3 {
                self.prepush_check(job, progress, &credentials, false, cancel)
                    .await?;
            }
            let token = self.token(progress).await?;
            match self
                .flow
                .patch_credentials(&job.id, &job.sandbox, &etag, &credentials, &token)
                .await
            {
                Ok(new_etag) => {
                    progress.etag = new_etag.clone();
                    let verified = if self.verify {
                        self.verify(job, progress).await
                    } else {
                        None
                    };
                    return Ok(JobResult::Rotated {
                        access_key_id: credentials.access_key_id.clone(),
                        expires_at: credentials.expiration,
                        etag: new_etag,
                        conflicts: progress.conflicts,
                        s3: progress.s3.clone(),
                        verified,
                    });
                }
                Err(FlowError::PreconditionFailed) => {
                    progress.conflicts += 1;
                    progress.etag = None;
                    if progress.conflicts > MAX_CONFLICTS_PER_JOB {
                        return Err(RotationError::Conflicts(progress.conflicts));
                    }
                    tracing::info!(
                        attempt = progress.conflicts,
                        status = 412,
                        "etag conflict, re-reading connection"
                    );
                }
                Err(FlowError::Unauthorized(detail)) => {
                    self.refresh_token(progress, detail).await?
                }
                Err(other) => {
                    // The etag could not be sent or the PATCH was refused:
                    // it is not trusted again, the next job re-reads first.
                    if matches!(other, FlowError::Malformed(_) | FlowError::Rejected { .. }) {
                        progress.etag = None;
                    }
                    return Err(other.into());
                }
            }
        }
    }

    /// `Err(NotLeader)` when this replica may not write now (by its own
    /// monotonic clock: see `coordination::Fence`).
    fn fenced(&self) -> Result<(), RotationError> {
        match &self.fence {
            Some(fence) if !fence.is_open() => Err(RotationError::NotLeader),
            _ => Ok(()),
        }
    }

    /// `GET /connections/{id}`, with the one 401 retry.
    async fn read(
        &self,
        job: &Job,
        progress: &mut Progress,
    ) -> Result<RemoteConnection, RotationError> {
        loop {
            let token = self.token(progress).await?;
            match self
                .flow
                .get_connection(&job.id, &job.sandbox, &token)
                .await
            {
                Err(FlowError::Unauthorized(detail)) => {
                    self.refresh_token(progress, detail).await?
                }
                other => {
                    let remote = other?;
                    progress.s3 = remote.s3.clone();
                    progress.target_read = true;
                    return Ok(remote);
                }
            }
        }
    }

    /// Credentials from the STS cache that passed the pre-push check.
    ///
    /// When S3 refuses *cached* credentials as a session
    /// ([`SESSION_REFUSALS`]: revoked, say, since they were issued), they
    /// are evicted from the cache and new ones are asked for and checked,
    /// once, in this same job. Credentials minted for this job that S3
    /// refuses are a refusal as before (slow cadence), and the cache is
    /// told, so other connections refused the same way do not each ask STS
    /// again.
    async fn checked_credentials(
        &self,
        job: &Job,
        progress: &mut Progress,
        cancel: &CancellationToken,
    ) -> Result<Arc<AwsCredentials>, RotationError> {
        let issued = self
            .credentials
            .issue(
                &job.sts,
                job.held.as_deref(),
                self.refresh_before,
                job.fresh_after,
            )
            .await?;
        let error = match self
            .prepush_check(job, progress, &issued.credentials, !issued.minted, cancel)
            .await
        {
            Ok(()) => return Ok(issued.credentials),
            Err(error) => error,
        };
        if !matches!(&error, RotationError::Prepush(e) if refuses_the_session(e)) {
            return Err(error);
        }
        let refused = issued.credentials.access_key_id.as_str();
        if issued.minted {
            self.credentials.refused_fresh(&job.sts, refused).await;
            return Err(error);
        }
        if !self.credentials.evict(&job.sts, refused).await {
            return Err(error);
        }
        // `held` is the refused key: the cache never hands it out again,
        // and anything newer in the slot came after the refusal.
        let again = self
            .credentials
            .issue(
                &job.sts,
                Some(refused),
                self.refresh_before,
                job.fresh_after,
            )
            .await?;
        match self
            .prepush_check(job, progress, &again.credentials, false, cancel)
            .await
        {
            Ok(()) => Ok(again.credentials),
            Err(error) => {
                if again.minted
                    && matches!(&error, RotationError::Prepush(e) if refuses_the_session(e))
                {
                    self.credentials
                        .refused_fresh(&job.sts, &again.credentials.access_key_id)
                        .await;
                }
                Err(error)
            }
        }
    }

    /// The pre-push S3 check with the new credentials: `Ok` to push; an
    /// error (nothing pushed) otherwise. Logs the denial at `error` with the
    /// S3 code, bucket, access key id and role, never a secret.
    ///
    /// `cached`: the credentials came from the STS cache, so a refusal of
    /// the session is retried with new ones ([`Self::checked_credentials`])
    /// when the cache lets go of them: logged at `info` then, the retry's
    /// outcome being the one that counts.
    async fn prepush_check(
        &self,
        job: &Job,
        progress: &mut Progress,
        credentials: &AwsCredentials,
        cached: bool,
        cancel: &CancellationToken,
    ) -> Result<(), RotationError> {
        let Some(probe) = &self.prepush else {
            return Ok(());
        };
        let (target, outcome) = loop {
            let Some(target) = progress.s3.clone() else {
                self.telemetry.prepush_check("skipped");
                progress.checked = None;
                tracing::info!(
                    access_key_id = %credentials.access_key_id,
                    "connection names no bucketName, pre-push check skipped"
                );
                return Ok(());
            };
            let outcome = tokio::select! {
                outcome = probe.check(&target, credentials) => outcome,
                () = cancel.cancelled() => return Err(RotationError::Cancelled),
            };
            // A denial on a target cached from an earlier job may only mean
            // the connection was edited since: read it (one GET, on this
            // failure path only) and check again if its S3 parameters changed.
            if matches!(outcome, Err(ProbeError::Denied { .. })) && !progress.target_read {
                let remote = self.read(job, progress).await?;
                progress.etag = Some(remote.etag);
                if progress.s3.as_ref() != Some(&target) {
                    tracing::info!(
                        bucket = %target.bucket,
                        "the connection's S3 parameters changed since they were cached, checking again"
                    );
                    continue;
                }
            }
            break (target, outcome);
        };
        match outcome {
            Ok(allowed) => {
                self.telemetry.prepush_check("allowed");
                tracing::info!(
                    access_key_id = %credentials.access_key_id,
                    bucket = %target.bucket,
                    prefix = target.prefix().unwrap_or_default(),
                    operation = allowed.operation,
                    region = %allowed.region,
                    attempt = allowed.attempts,
                    "pre-push check passed"
                );
                progress.checked = Some(target);
                Ok(())
            }
            Err(error) => {
                self.telemetry.prepush_check(error.result());
                let role = job.sts.describe();
                let retried = cached
                    && refuses_the_session(&error)
                    && self
                        .credentials
                        .is_evictable(&job.sts, &credentials.access_key_id)
                        .await;
                if let (true, ProbeError::Denied { code, .. }) = (retried, &error) {
                    tracing::info!(
                        s3_code = %code,
                        bucket = %target.bucket,
                        prefix = target.prefix().unwrap_or_default(),
                        access_key_id = %credentials.access_key_id,
                        role = %role,
                        error = %error,
                        "cached credentials refused by S3, asking STS for new ones"
                    );
                } else if let ProbeError::Denied { code, .. } = &error {
                    tracing::error!(
                        s3_code = %code,
                        bucket = %target.bucket,
                        prefix = target.prefix().unwrap_or_default(),
                        access_key_id = %credentials.access_key_id,
                        role = %role,
                        error = %error,
                        "new credentials cannot list the bucket, not pushed; the connection keeps its current credentials"
                    );
                } else {
                    tracing::warn!(
                        bucket = %target.bucket,
                        access_key_id = %credentials.access_key_id,
                        role = %role,
                        error = %error,
                        "pre-push check failed, not pushed"
                    );
                }
                Err(RotationError::Prepush(error))
            }
        }
    }

    async fn token(&self, progress: &mut Progress) -> Result<Arc<AccessToken>, RotationError> {
        if let Some(token) = &progress.token {
            return Ok(Arc::clone(token));
        }
        let token = self.ims.token().await?;
        progress.token = Some(Arc::clone(&token));
        Ok(token)
    }

    /// After a 401: drop the token (once per job) so the next call fetches a
    /// new one; a second 401 is a failure.
    async fn refresh_token(
        &self,
        progress: &mut Progress,
        detail: String,
    ) -> Result<(), RotationError> {
        if progress.token_refreshed {
            return Err(FlowError::Unauthorized(detail).into());
        }
        tracing::info!(
            status = 401,
            "ims token refused by flow service, fetching a new one"
        );
        if let Some(token) = progress.token.take() {
            self.ims.invalidate(&token).await;
        }
        progress.token_refreshed = true;
        Ok(())
    }

    /// `[rotation] verify`: asks Flow Service to test the new credentials
    /// against S3 and logs the answer; never fails the rotation. Answers
    /// whether the test passed (`None`: it could not run).
    async fn verify(&self, job: &Job, progress: &mut Progress) -> Option<bool> {
        let result = match self.token(progress).await {
            Ok(token) => self
                .flow
                .test_connection(&job.id, &job.sandbox, &token)
                .await
                .map_err(RotationError::from),
            Err(e) => Err(e),
        };
        match &result {
            Ok(true) => tracing::info!("connection test passed"),
            Ok(false) => tracing::warn!(
                "connection test failed: Flow Service cannot reach S3 with the new credentials; check the role's S3 permissions"
            ),
            Err(error) => tracing::warn!(error = %error, "connection test could not run"),
        }
        result.ok()
    }
}

#[cfg(test)]
mod tests {
    //! The job over scripted remotes, on paused time: no socket anywhere.
    use super::*;
    use futures::future::BoxFuture;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use secrecy::SecretString;

    /// A Flow Service that answers from scripts and records every call.
    #[derive(Debug, Default)]
    struct ScriptedFlow {
        gets: Mutex<VecDeque<Result<RemoteConnection, FlowError>>>,
        patches: Mutex<VecDeque<Result<Option<String>, FlowError>>>,
        tests: Mutex<VecDeque<Result<bool, FlowError>>>,
        /// `get:ETAG-less`, `patch:<etag>:<token>`, `test`: in order.
        calls: Mutex<Vec<String>>,
        /// Closed after the next GET (the lease lost between GET and PATCH).
        close_after_get: Mutex<Option<crate::coordination::Fence>>,
    }

    impl ScriptedFlow {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        /// The answer of the next GET.
        fn answer_get(&self, answer: Result<RemoteConnection, FlowError>) {
            self.gets.lock().unwrap().push_back(answer);
        }

        /// The answer of the next PATCH.
        fn answer_patch(&self, answer: Result<Option<String>, FlowError>) {
            self.patches.lock().unwrap().push_back(answer);
        }
    }

    fn remote(etag: &str) -> RemoteConnection {
        RemoteConnection {
            etag: etag.to_owned(),
            name: Some("sales".to_owned()),
            s3: Some(S3Target {
                bucket: "sales-bucket".to_owned(),
                folder: Some("landing".to_owned()),
                service_url: None,
            }),
        }
    }

    impl FlowApi for ScriptedFlow {
        fn get_connection<'a>(
            &'a self,
            _id: &'a str,
            _sandbox: &'a str,
            _token: &'a AccessToken,
        ) -> BoxFuture<'a, Result<RemoteConnection, FlowError>> {
            self.calls.lock().unwrap().push("get".to_owned());
            if let Some(fence) = self.close_after_get.lock().unwrap().take() {
                fence.close();
            }
            let answer = self
                .gets
                .lock()
                .unwrap()
                .pop_front()
                .expect("an unscripted GET");
            Box::pin(async move { answer })
        }
        fn patch_credentials<'a>(
            &'a self,
            _id: &'a str,
            _sandbox: &'a str,
            etag: &'a str,
            _credentials: &'a AwsCredentials,
            token: &'a AccessToken,
        ) -> BoxFuture<'a, Result<Option<String>, FlowError>> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("patch:{etag}:{}", token.expose()));
            let answer = self
                .patches
                .lock()
                .unwrap()
                .pop_front()
                .expect("an unscripted PATCH");
            Box::pin(async move { answer })
        }
        fn test_connection<'a>(
            &'a self,
            _id: &'a str,
            _sandbox: &'a str,
            _token: &'a AccessToken,
        ) -> BoxFuture<'a, Result<bool, FlowError>> {
            self.calls.lock().unwrap().push("test".to_owned());
            let answer = self
                .tests
                .lock()
                .unwrap()
                .pop_front()
                .expect("an unscripted test");
            Box::pin(async move { answer })
        }
    }

    /// IMS: token N for the Nth fetch; counts invalidations.
    #[derive(Debug, Default)]
    struct CountingIms {
        fetched: AtomicU64,
        invalidated: AtomicU64,
        current: Mutex<Option<Arc<AccessToken>>>,
    }

    impl TokenSource for CountingIms {
        fn token(&self) -> BoxFuture<'_, Result<Arc<AccessToken>, ImsError>> {
            let mut current = self.current.lock().unwrap();
            let token = current
                .get_or_insert_with(|| {
                    let n = self.fetched.fetch_add(1, Ordering::Relaxed) + 1;
                    Arc::new(AccessToken::for_tests(&format!("token-{n}"), n))
                })
                .clone();
            Box::pin(async move { Ok(token) })
        }
        fn invalidate<'a>(&'a self, _token: &'a AccessToken) -> BoxFuture<'a, ()> {
            self.invalidated.fetch_add(1, Ordering::Relaxed);
            *self.current.lock().unwrap() = None;
            Box::pin(async {})
        }
    }

    /// STS: a new key pair per call, an hour long (`ASIATESTKEY000000001`,
    /// `...02`, ...); while `down`, every call fails (counted all the same).
    #[derive(Debug, Default)]
    struct Sts {
        calls: AtomicU64,
        down: std::sync::atomic::AtomicBool,
    }

    impl crate::remote::sts::CredentialSource for Sts {
        fn issue<'a>(
            &'a self,
            _request: &'a StsRequest,
        ) -> BoxFuture<'a, Result<AwsCredentials, StsError>> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            let down = self.down.load(Ordering::Relaxed);
            Box::pin(async move {
                if down {
                    return Err(StsError::Unavailable("scripted outage".to_owned()));
                }
                Ok(AwsCredentials {
                    access_key_id: format!("ASIATESTKEY{n:09}"),
                    secret_access_key: SecretString::from(format!(
                        "wJalrXUtnFEMIK7MDENGbPxRfiCY{n:012}"
                    )),
                    session_token: SecretString::from(format!(
                        "IQoJb3JpZ2luX2VjE{}{n:08}",
                        "A".repeat(300)
                    )),
                    expiration: crate::clock::wall_now() + Duration::from_secs(3600),
                })
            })
        }
    }

    /// The S3 check: allows, or denies every time (or only these keys),
    /// with `code` (`AccessDenied` unless set).
    #[derive(Debug)]
    struct Probe {
        deny: bool,
        checks: AtomicU64,
        deny_keys: Mutex<Vec<String>>,
        code: Mutex<Option<String>>,
    }

    impl S3Probe for Probe {
        fn check<'a>(
            &'a self,
            target: &'a S3Target,
            credentials: &'a AwsCredentials,
        ) -> BoxFuture<'a, Result<crate::remote::s3probe::Allowed, ProbeError>> {
            self.checks.fetch_add(1, Ordering::Relaxed);
            let denied = self.deny
                || self
                    .deny_keys
                    .lock()
                    .unwrap()
                    .contains(&credentials.access_key_id);
            let outcome = if denied {
                Err(ProbeError::Denied {
                    code: self
                        .code
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| "AccessDenied".to_owned()),
                    message: "Access Denied".to_owned(),
                    status: 403,
                    operation: "ListObjectsV2",
                    target: target.describe(),
                })
            } else {
                Ok(crate::remote::s3probe::Allowed {
                    operation: "ListObjectsV2",
                    region: "us-east-1".to_owned(),
                    attempts: 1,
                })
            };
            Box::pin(async move { outcome })
        }
    }

    struct World {
        flow: ScriptedFlow,
        ims: CountingIms,
        sts: Arc<Sts>,
        credentials: CredentialCache,
        probe: Probe,
        fence: Option<crate::coordination::Fence>,
        telemetry: Telemetry,
        verify: bool,
    }

    impl World {
        fn new() -> Self {
            let sts = Arc::new(Sts::default());
            Self {
                flow: ScriptedFlow::default(),
                ims: CountingIms::default(),
                credentials: CredentialCache::new(sts.clone(), Duration::from_secs(1)),
                sts,
                probe: Probe {
                    deny: false,
                    checks: AtomicU64::new(0),
                    deny_keys: Mutex::new(Vec::new()),
                    code: Mutex::new(None),
                },
                fence: None,
                telemetry: Telemetry::new(),
                verify: false,
            }
        }

        async fn run(&self, job: &Job) -> JobResult {
            let rotation = Rotation {
                flow: &self.flow,
                ims: &self.ims,
                credentials: &self.credentials,
                prepush: Some(&self.probe),
                fence: self.fence.as_ref(),
                telemetry: &self.telemetry,
                refresh_before: Duration::from_secs(1200),
                verify: self.verify,
                dry_run: false,
            };
            rotation.run(job, &CancellationToken::new()).await
        }
    }

    /// A job for a connection whose etag and bucket are not known yet.
    fn job() -> Job {
        Job {
            id: "c1".to_owned(),
            sandbox: "prod".to_owned(),
            sts: Arc::new(StsRequest {
                role_arn: None,
                external_id: None,
                session_name: "aep".to_owned(),
                session_policy: None,
                policy_arns: Vec::new(),
                duration: Duration::from_secs(3600),
                attribution: Ok(crate::config::ExpandedAttribution::default()),
            }),
            known_etag: None,
            held: None,
            resume_if_etag: None,
            s3: None,
            fresh_after: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_412_re_reads_the_connection_and_patches_with_the_new_etag() {
        let world = World::new();
        world
            .flow
            .gets
            .lock()
            .unwrap()
            .extend([Ok(remote("\"e1\"")), Ok(remote("\"e2\""))]);
        world.flow.patches.lock().unwrap().extend([
            Err(FlowError::PreconditionFailed),
            Ok(Some("\"e3\"".to_owned())),
        ]);
        let result = world.run(&job()).await;
        let JobResult::Rotated {
            etag, conflicts, ..
        } = result
        else {
            panic!("not rotated: {result:?}");
        };
        assert_eq!((etag.as_deref(), conflicts), (Some("\"e3\""), 1));
        assert_eq!(
            world.flow.calls(),
            ["get", "patch:\"e1\":token-1", "get", "patch:\"e2\":token-1"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_412_on_every_patch_ends_in_a_conflict_failure_not_a_loop() {
        let world = World::new();
        let n = MAX_CONFLICTS_PER_JOB as usize + 1;
        world
            .flow
            .gets
            .lock()
            .unwrap()
            .extend((0..n).map(|i| Ok(remote(&format!("\"e{i}\"")))));
        world
            .flow
            .patches
            .lock()
            .unwrap()
            .extend((0..n).map(|_| Err(FlowError::PreconditionFailed)));
        let result = world.run(&job()).await;
        assert!(
            matches!(result, JobResult::Failed { error: RotationError::Conflicts(c), etag: None, .. } if c == MAX_CONFLICTS_PER_JOB + 1),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pre_push_denial_pushes_nothing() {
        let mut world = World::new();
        world.probe.deny = true;
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        let JobResult::Failed { error, etag, .. } = result else {
            panic!("pushed: {result:?}");
        };
        assert!(
            matches!(error, RotationError::Prepush(ProbeError::Denied { .. })),
            "{error:?}"
        );
        assert_eq!(error.retry_kind(), RetryKind::Slow);
        // The etag read stays known: the next attempt needs no GET for it.
        assert_eq!(etag.as_deref(), Some("\"e1\""));
        assert_eq!(world.flow.calls(), ["get"], "no PATCH after a denial");
        assert_eq!(world.probe.checks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_lost_between_get_and_patch_stops_before_the_patch() {
        let mut world = World::new();
        let fence = crate::coordination::Fence::new();
        fence.open_until(crate::clock::mono_now() + Duration::from_secs(60));
        *world.flow.close_after_get.lock().unwrap() = Some(fence.clone());
        world.fence = Some(fence);
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        assert!(
            matches!(
                result,
                JobResult::Failed {
                    error: RotationError::NotLeader,
                    ..
                }
            ),
            "{result:?}"
        );
        assert_eq!(
            world.flow.calls(),
            ["get"],
            "a PATCH after the lease was lost"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_verification_is_logged_and_counted_but_the_rotation_stands() {
        let mut world = World::new();
        world.verify = true;
        world.flow.answer_get(Ok(remote("\"e1\"")));
        world.flow.answer_patch(Ok(Some("\"e2\"".to_owned())));
        world.flow.tests.lock().unwrap().push_back(Ok(false));
        let result = world.run(&job()).await;
        // Counted by the connection, from the result.
        assert!(
            matches!(
                result,
                JobResult::Rotated {
                    verified: Some(false),
                    ..
                }
            ),
            "{result:?}"
        );
        assert_eq!(world.flow.calls(), ["get", "patch:\"e1\":token-1", "test"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_fetches_a_new_token_once_and_patches_with_it() {
        let world = World::new();
        world.flow.answer_get(Ok(remote("\"e1\"")));
        world.flow.patches.lock().unwrap().extend([
            Err(FlowError::Unauthorized("token revoked".to_owned())),
            Ok(Some("\"e2\"".to_owned())),
        ]);
        let result = world.run(&job()).await;
        assert!(matches!(result, JobResult::Rotated { .. }), "{result:?}");
        assert_eq!(
            world.flow.calls(),
            ["get", "patch:\"e1\":token-1", "patch:\"e1\":token-2"]
        );
        assert_eq!(world.ims.invalidated.load(Ordering::Relaxed), 1);
        // A second 401 in the same job is a failure, not another token.
        let world = World::new();
        world.flow.answer_get(Ok(remote("\"e1\"")));
        world.flow.patches.lock().unwrap().extend([
            Err(FlowError::Unauthorized("no".to_owned())),
            Err(FlowError::Unauthorized("still no".to_owned())),
        ]);
        let result = world.run(&job()).await;
        assert!(
            matches!(
                result,
                JobResult::Failed {
                    error: RotationError::Flow(FlowError::Unauthorized(_)),
                    ..
                }
            ),
            "{result:?}"
        );
        assert_eq!(world.ims.fetched.load(Ordering::Relaxed), 2);
    }

    fn key(n: u64) -> String {
        format!("ASIATESTKEY{n:09}")
    }

    impl World {
        /// STS calls so far.
        fn minted(&self) -> u64 {
            self.sts.calls.load(Ordering::Relaxed)
        }

        /// Another connection with the same identity got credentials: they
        /// are cached now.
        async fn warm_cache(&self) -> String {
            let issued = self
                .credentials
                .issue(&job().sts, None, Duration::from_secs(1200), None)
                .await
                .unwrap();
            issued.credentials.access_key_id.clone()
        }

        fn script_one_rotation(&self) {
            self.flow
                .gets
                .lock()
                .unwrap()
                .push_back(Ok(remote("\"e1\"")));
            self.flow
                .patches
                .lock()
                .unwrap()
                .push_back(Ok(Some("\"e2\"".to_owned())));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cached_credentials_refused_by_s3_are_evicted_and_new_ones_minted_once() {
        let world = World::new();
        let cached = world.warm_cache().await;
        // The role's sessions were revoked: S3 refuses the cached key.
        world.probe.deny_keys.lock().unwrap().push(cached.clone());
        world.script_one_rotation();
        let result = world.run(&job()).await;
        let JobResult::Rotated { access_key_id, .. } = result else {
            panic!("not rotated: {result:?}");
        };
        assert_eq!(access_key_id, key(2), "pushed the newly minted key");
        assert_eq!(world.minted(), 2, "one STS call for the retry");
        assert_eq!(world.probe.checks.load(Ordering::Relaxed), 2);
        assert_eq!(world.flow.calls(), ["get", "patch:\"e1\":token-1"]);
        // The refused key is gone from the cache: the next connection gets
        // the new one without a call.
        let next = world.warm_cache().await;
        assert_eq!(next, key(2));
        assert_eq!(world.minted(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cached_credentials_refused_and_new_ones_refused_too_mint_exactly_once() {
        // Revoked, then the role itself lost S3 access: every key is refused.
        let mut world = World::new();
        world.warm_cache().await;
        world.probe.deny = true;
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        let JobResult::Failed { error, .. } = result else {
            panic!("pushed: {result:?}");
        };
        assert_eq!(error.retry_kind(), RetryKind::Slow, "the slow cadence");
        assert_eq!(world.minted(), 2, "the cached key, then one new mint");
        assert_eq!(world.probe.checks.load(Ordering::Relaxed), 2);
        assert_eq!(world.flow.calls(), ["get"], "nothing pushed");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_cached_credentials_are_never_handed_out_again_even_when_the_new_mint_fails() {
        let world = World::new();
        let revoked = world.warm_cache().await;
        world.probe.deny_keys.lock().unwrap().push(revoked.clone());
        world.sts.down.store(true, Ordering::Relaxed);
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        assert!(matches!(result, JobResult::Failed { .. }), "{result:?}");
        assert_eq!(world.minted(), 2, "the retry asked STS once");
        // The next connection of the same identity must not be given the
        // revoked key from the cache while STS is down.
        let next = world
            .credentials
            .issue(&job().sts, None, Duration::from_secs(1200), None)
            .await;
        if let Ok(issued) = next {
            assert_ne!(issued.credentials.access_key_id, revoked);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn freshly_minted_credentials_refused_by_s3_keep_the_slow_cadence() {
        let mut world = World::new();
        world.probe.deny = true;
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        let JobResult::Failed { error, .. } = result else {
            panic!("pushed: {result:?}");
        };
        assert_eq!(error.retry_kind(), RetryKind::Slow);
        assert_eq!(world.minted(), 1, "no second call for minted credentials");
        assert_eq!(world.probe.checks.load(Ordering::Relaxed), 1);
        // Another connection handed those cached credentials and refused
        // the same way (a permissions problem) does not ask STS again.
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        assert!(matches!(result, JobResult::Failed { .. }), "{result:?}");
        assert_eq!(world.minted(), 1);
        assert_eq!(world.probe.checks.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_that_is_not_about_the_session_keeps_the_cached_credentials() {
        let world = World::new();
        let cached = world.warm_cache().await;
        world.probe.deny_keys.lock().unwrap().push(cached.clone());
        *world.probe.code.lock().unwrap() = Some("NoSuchBucket".to_owned());
        world.flow.answer_get(Ok(remote("\"e1\"")));
        let result = world.run(&job()).await;
        assert!(matches!(result, JobResult::Failed { .. }), "{result:?}");
        assert_eq!(world.minted(), 1);
        assert_eq!(world.warm_cache().await, cached);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_told_to_use_fresh_credentials_does_not_take_older_cached_ones() {
        let world = World::new();
        let cached = world.warm_cache().await;
        tokio::time::advance(Duration::from_secs(5)).await;
        world.script_one_rotation();
        let mut fresh = job();
        fresh.fresh_after = Some(crate::clock::mono_now());
        let result = world.run(&fresh).await;
        let JobResult::Rotated { access_key_id, .. } = result else {
            panic!("not rotated: {result:?}");
        };
        assert_ne!(access_key_id, cached);
        assert_eq!(world.minted(), 2);
        assert_eq!(world.probe.checks.load(Ordering::Relaxed), 1);
    }
}
