//! The clients a scheduler's jobs run with: built once for a config, and
//! rebuilt on a reload keeping every part whose settings did not change
//! (the IMS token cache, the STS answer cache, the request gate), or a fixed
//! runner that reloads keep (tests).

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use url::Url;

use super::Options;
use crate::config::Config;
use crate::observe::telemetry::Telemetry;
use crate::policy::backoff::BackoffPolicy;
use crate::remote::flow::FlowClient;
use crate::remote::ims::ImsClient;
use crate::remote::shaping::RequestGate;
use crate::remote::sts::{AwsSts, CredentialCache};
use crate::rotation::{JobRunner, Rotator};

/// Builds the remote clients for `config`, keeping from `previous` (the
/// clients of the running config `old`) every part whose settings did not
/// change: the IMS token cache, the STS answer cache, the request gate.
pub async fn build_rotator(
    config: &Config,
    options: &Options,
    telemetry: &Arc<Telemetry>,
    previous: Option<(&Config, &Rotator)>,
) -> anyhow::Result<Rotator> {
    let rotation = &config.rotation;
    let http = crate::remote::http::client(rotation).context("building the HTTP client")?;
    let kept = previous.map(|(old, rotator)| {
        (
            ClientSettings::of(old).kept(&ClientSettings::of(config)),
            rotator,
        )
    });
    let gate = match kept {
        Some((kept, rotator)) if kept.gate => rotator.flow.gate(),
        _ => Arc::new(RequestGate::new(
            rotation.concurrency,
            rotation.max_requests_per_second,
            rotation.retry_max,
        )),
    };
    let ims = match kept {
        Some((kept, rotator)) if kept.ims => Arc::clone(&rotator.ims),
        _ => Arc::new(ImsClient::new(
            http.clone(),
            &config.adobe,
            BackoffPolicy {
                min: rotation.retry_min,
                max: rotation.retry_max,
            },
            telemetry.requests(),
        )),
    };
    let credentials = match kept {
        Some((kept, rotator)) if kept.sts => Arc::clone(&rotator.credentials),
        _ => {
            let sts = AwsSts::new(
                &config.aws,
                &options.identity,
                rotation.request_timeout,
                telemetry.requests(),
            )
            .await;
            Arc::new(CredentialCache::new(Arc::new(sts), rotation.retry_min / 2))
        }
    };
    Ok(Rotator {
        flow: FlowClient::new(
            http,
            &config.adobe,
            gate,
            telemetry.requests(),
            rotation.retry_min,
        ),
        ims,
        credentials,
        telemetry: Arc::clone(telemetry),
        refresh_before: rotation.refresh_before,
        verify: rotation.verify,
        dry_run: options.dry_run,
        prepush: crate::remote::s3probe::from_config(config)?,
        fence: options.fence.clone(),
    })
}

/// What each long-lived client is built from, read off the config types by
/// destructuring them without `..`: a field added to `[adobe]`, `[aws]` or
/// `[rotation]` does not compile until it is placed here (with the clients
/// it concerns, or `_` for none). `client_secret_file` was once left out of
/// a hand-kept list: the kept IMS client then re-read the old file after
/// `invalid_client`.
#[derive(PartialEq)]
struct ClientSettings<'a> {
    /// Timeouts of the one HTTP client IMS and STS are built on.
    http: Duration,
    /// The request gate: concurrency, rate, the cap of a 429's pause.
    gate: (NonZeroUsize, Option<NonZeroU32>, Duration),
    /// The IMS client: the credential and where it is sent, its retry pace.
    ims: (
        &'a str,
        &'a str,
        &'a Option<PathBuf>,
        &'a str,
        &'a [String],
        &'a Url,
        Duration,
        Duration,
    ),
    /// The STS client: region and endpoint, and the failure-sharing window.
    sts: (&'a Option<String>, &'a Option<Url>, Duration),
}

/// Which clients a reload keeps.
#[derive(Debug, Clone, Copy)]
struct Kept {
    gate: bool,
    ims: bool,
    sts: bool,
}

impl<'a> ClientSettings<'a> {
    fn of(config: &'a Config) -> Self {
        use secrecy::ExposeSecret;
        let crate::config::AdobeConfig {
            client_id,
            client_secret,
            client_secret_file,
            client_secret_deferred: _,
            org_id,
            scopes,
            ims_url,
            // Flow Service's address: the Flow client is rebuilt every time.
            platform_url: _,
        } = &config.adobe;
        let crate::config::AwsConfig {
            region,
            sts_endpoint,
            // The S3 check and the STS request: rebuilt or read per job.
            s3_endpoint: _,
            s3_endpoints: _,
            role_arn: _,
            external_id: _,
            session_name: _,
            attribution: _,
        } = &config.aws;
        let crate::config::RotationConfig {
            concurrency,
            max_requests_per_second,
            retry_min,
            retry_max,
            request_timeout,
            // Read by the scheduler and the jobs, not by a client.
            session_duration: _,
            refresh_before: _,
            jitter: _,
            verify: _,
            prepush_check: _,
            shutdown_grace: _,
            // Read by the health check task, which is handed each config.
            health_check_every: _,
        } = &config.rotation;
        Self {
            http: *request_timeout,
            gate: (*concurrency, *max_requests_per_second, *retry_max),
            ims: (
                client_id,
                client_secret.expose_secret(),
                client_secret_file,
                org_id,
                scopes,
                ims_url,
                *retry_min,
                *retry_max,
            ),
            sts: (region, sts_endpoint, *retry_min),
        }
    }

    /// The clients `next` can keep from `self`'s.
    fn kept(&self, next: &Self) -> Kept {
        let http = self.http == next.http;
        Kept {
            gate: self.gate == next.gate,
            ims: http && self.ims == next.ims,
            sts: http && self.sts == next.sts,
        }
    }
}

/// What runs a scheduler's jobs: the real clients (rebuilt on reload where
/// their settings change), or a fixed runner (tests).
#[derive(Debug, Clone)]
pub enum Runner {
    /// The real clients; a reload rebuilds what its settings change.
    Real(Arc<Rotator>),
    /// A fixed runner (tests: scripted jobs on paused time); reloads keep it.
    Fixed(Arc<dyn JobRunner>),
}

impl Runner {
    pub(super) fn job_runner(&self) -> Arc<dyn JobRunner> {
        match self {
            Self::Real(rotator) => Arc::clone(rotator) as Arc<dyn JobRunner>,
            Self::Fixed(runner) => Arc::clone(runner),
        }
    }
}
