//! One rotation of one connection: IMS token → (GET for the etag and the S3
//! target when they are not known) → STS credentials → pre-push S3 check
//! with the new credentials ([`crate::s3probe`]; not pushed unless it passes)
//! → PATCH with `If-Match`; a 412 re-reads the
//! connection and PATCHes again at once (bounded), a 401 fetches a new IMS
//! token and retries once. Retry *timing* is not decided here: the job reports
//! an outcome and the scheduler plans the next attempt.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::flow::{FlowClient, FlowError, RemoteConnection};
use crate::ims::{AccessToken, ImsClient, ImsError};
use crate::s3probe::{ProbeError, S3Probe, S3Target};
use crate::schedule::RetryKind;
use crate::sts::{AwsCredentials, CredentialCache, StsError, StsRequest};
use crate::telemetry::Telemetry;

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
    /// Which credentials it gets.
    pub sts: StsRequest,
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
}

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
        let mut progress = Progress {
            // A cached etag that cannot be sent (a corrupt state file, an
            // older version that kept anything) is dropped: the job re-reads.
            etag: job
                .known_etag
                .clone()
                .filter(|etag| crate::flow::is_valid_etag(etag)),
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
        let credentials = self
            .credentials
            .get(&job.sts, job.held.as_deref(), self.refresh_before)
            .await?;
        self.prepush_check(job, progress, &credentials, cancel)
            .await?;
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
                self.prepush_check(job, progress, &credentials, cancel)
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
                    if self.verify {
                        self.verify(job, progress).await;
                    }
                    return Ok(JobResult::Rotated {
                        access_key_id: credentials.access_key_id.clone(),
                        expires_at: credentials.expiration,
                        etag: new_etag,
                        conflicts: progress.conflicts,
                        s3: progress.s3.clone(),
                    });
                }
                Err(FlowError::PreconditionFailed) => {
                    progress.conflicts += 1;
                    progress.etag = None;
                    self.telemetry.etag_conflict(&job.id);
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

    /// The pre-push S3 check with the new credentials: `Ok` to push; an
    /// error (nothing pushed) otherwise. Logs the denial at `error` with the
    /// S3 code, bucket, access key id and role, never a secret.
    async fn prepush_check(
        &self,
        job: &Job,
        progress: &mut Progress,
        credentials: &AwsCredentials,
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
                if let ProbeError::Denied { code, .. } = &error {
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
    /// against S3 and logs the answer; never fails the rotation.
    async fn verify(&self, job: &Job, progress: &mut Progress) {
        let result = match self.token(progress).await {
            Ok(token) => self
                .flow
                .test_connection(&job.id, &job.sandbox, &token)
                .await
                .map_err(RotationError::from),
            Err(e) => Err(e),
        };
        if let Ok(passed) = result {
            self.telemetry.verification(&job.id, passed);
        }
        match result {
            Ok(true) => tracing::info!("connection test passed"),
            Ok(false) => tracing::warn!(
                "connection test failed: Flow Service cannot reach S3 with the new credentials; check the role's S3 permissions"
            ),
            Err(error) => tracing::warn!(error = %error, "connection test could not run"),
        }
    }
}
