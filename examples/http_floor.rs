//! The CPU cost of one Flow Service round trip on this machine, without the
//! daemon: the floor under `scripts/bench.py`'s "CPU per rotation".
//!
//! Run through `python3 scripts/http_floor.py` (which starts the simulator
//! and gives this its config and an AWS identity), or by hand:
//! `cargo run --release --example http_floor -- CONFIG [CONCURRENCY]` with
//! the AWS default chain able to call the config's STS.
//!
//! It takes an IMS token and one set of STS credentials through the
//! daemon's own clients, then for every connection of the config reads its
//! etag (`GET /connections/{id}`) and PATCHes the three credentials with
//! `If-Match`, `CONCURRENCY` connections at a time (default 32), three
//! times over:
//!
//! - `bare`: `reqwest` alone, the headers and bodies the daemon sends, the
//!   etag taken from the answer with `serde_json::Value`;
//! - `flow_client`: the same through the daemon's `FlowClient` (request
//!   gate, telemetry, capped body reads, answer checks);
//! - `hyper_conn`: hyper's HTTP/1 client alone (`client::conn::http1`), one
//!   kept-alive connection per concurrent worker, no pool, no URL parsing:
//!   what a request costs below reqwest (plain HTTP only, as the simulator
//!   speaks).
//!
//! and prints one JSON line: per phase the requests made, their statuses,
//! the process's CPU seconds (utime + stime from `/proc/self/stat`) and CPU
//! milliseconds per request. Nothing of the scheduler, state or logging runs.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aep_s3_rotator::config::Config;
use aep_s3_rotator::observe::telemetry::Telemetry;
use aep_s3_rotator::remote::flow::{CREDENTIAL_PATHS, FlowClient};
use aep_s3_rotator::remote::ims::AccessToken;
use aep_s3_rotator::remote::sts::{AwsCredentials, SourceIdentity, StsRequest};
use aep_s3_rotator::scheduler::{Mode, Options, build_rotator};
use anyhow::{Context, bail};
use futures::StreamExt;
use secrecy::ExposeSecret;

/// Clock ticks per second of `/proc/self/stat` (`getconf CLK_TCK`, 100 on
/// every Linux this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// This process's user + system CPU seconds.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<f64> {
        let field = fields.get(i).context("short /proc/self/stat")?;
        Ok(field.parse::<f64>()? / TICKS_PER_SECOND)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ")".
    Ok(tick(11)? + tick(12)?)
}

/// What one phase did.
#[derive(Debug, Default, serde::Serialize)]
struct Phase {
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    cpu_seconds: f64,
    wall_seconds: f64,
    cpu_ms_per_request: f64,
}

impl Phase {
    fn finish(mut self, cpu: f64, wall: Duration) -> Self {
        self.cpu_seconds = cpu;
        self.wall_seconds = wall.as_secs_f64();
        if self.requests > 0 {
            self.cpu_ms_per_request = cpu * 1000.0 / self.requests as f64;
        }
        self
    }
}

/// The connections' ids and sandboxes.
fn targets(config: &Config) -> Vec<(String, String)> {
    config
        .connections
        .iter()
        .map(|c| (c.id.clone(), c.sandbox.clone()))
        .collect()
}

/// The PATCH body the daemon sends, built per request as the daemon does.
fn patch_body(credentials: &AwsCredentials) -> anyhow::Result<Vec<u8>> {
    let values = [
        credentials.access_key_id.as_str(),
        credentials.secret_access_key.expose_secret(),
        credentials.session_token.expose_secret(),
    ];
    let patch: Vec<serde_json::Value> = CREDENTIAL_PATHS
        .into_iter()
        .zip(values)
        .map(|(path, value)| serde_json::json!({"op": "replace", "path": path, "value": value}))
        .collect();
    Ok(serde_json::to_vec(&patch)?)
}

/// `GET` then `PATCH` of one connection with `reqwest` alone; answers the
/// two statuses.
async fn bare_one(
    http: &reqwest::Client,
    config: &Config,
    token: &AccessToken,
    credentials: &AwsCredentials,
    (id, sandbox): &(String, String),
) -> anyhow::Result<[u16; 2]> {
    let url = format!(
        "{}/data/foundation/flowservice/connections/{id}",
        config.adobe.platform_url.as_str().trim_end_matches('/')
    );
    let headers = |request: reqwest::RequestBuilder| {
        request
            .bearer_auth(token.expose())
            .header("x-api-key", &config.adobe.client_id)
            .header("x-gw-ims-org-id", &config.adobe.org_id)
            .header("x-sandbox-name", sandbox)
    };
    let read = headers(http.get(&url)).send().await?;
    let read_status = read.status().as_u16();
    let body: serde_json::Value = serde_json::from_slice(&read.bytes().await?)?;
    let Some(etag) = body["items"][0]["etag"].as_str() else {
        bail!("no items[0].etag in the answer for {id} (HTTP {read_status})");
    };
    let written = headers(http.patch(&url))
        .header(reqwest::header::IF_MATCH, etag)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(patch_body(credentials)?)
        .send()
        .await?;
    let patch_status = written.status().as_u16();
    written.bytes().await?;
    Ok([read_status, patch_status])
}

/// The same through the daemon's `FlowClient`.
async fn flow_one(
    flow: &FlowClient,
    token: &AccessToken,
    credentials: &AwsCredentials,
    (id, sandbox): &(String, String),
) -> anyhow::Result<[u16; 2]> {
    let remote = flow.get_connection(id, sandbox, token).await?;
    flow.patch_credentials(id, sandbox, &remote.etag, credentials, token)
        .await?;
    Ok([200, 200])
}

/// Runs `one` over every target, `concurrency` at a time, and measures it.
async fn phase<'a, F, Fut>(
    targets: &'a [(String, String)],
    concurrency: usize,
    one: F,
) -> anyhow::Result<Phase>
where
    F: Fn(&'a (String, String)) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<[u16; 2]>>,
{
    let started = aep_s3_rotator::clock::mono_now();
    let cpu_before = cpu_seconds()?;
    let mut results = futures::stream::iter(targets)
        .map(one)
        .buffer_unordered(concurrency);
    let mut phase = Phase::default();
    while let Some(result) = results.next().await {
        for status in result? {
            phase.requests += 1;
            *phase.statuses.entry(status).or_default() += 1;
        }
    }
    let cpu = cpu_seconds()? - cpu_before;
    Ok(phase.finish(cpu, started.elapsed()))
}

/// `GET` then `PATCH` of every target over `concurrency` kept-alive
/// connections driven by hyper's HTTP/1 client directly: each worker owns
/// one connection and takes the next target from a shared counter.
async fn hyper_phase(
    config: &Config,
    token: &AccessToken,
    credentials: &AwsCredentials,
    targets: &[(String, String)],
    concurrency: usize,
) -> anyhow::Result<Phase> {
    use http_body_util::{BodyExt, Full};
    use hyper::Request;
    use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, IF_MATCH};

    let base = &config.adobe.platform_url;
    let host = base.host_str().context("platform_url has no host")?;
    let port = base
        .port_or_known_default()
        .context("platform_url has no port")?;
    if base.scheme() != "http" {
        bail!("the hyper phase speaks plain HTTP only; {base} is not");
    }
    let authority = format!("{host}:{port}");
    let prefix = base.path().trim_end_matches('/').to_owned();
    let bearer = format!("Bearer {}", token.expose());
    let next = std::sync::atomic::AtomicUsize::new(0);

    let started = aep_s3_rotator::clock::mono_now();
    let cpu_before = cpu_seconds()?;
    let worker = || async {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.set_nodelay(true)?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut statuses: Vec<u16> = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((id, sandbox)) = targets.get(i) else {
                return anyhow::Ok(statuses);
            };
            let path = format!("{prefix}/data/foundation/flowservice/connections/{id}");
            let request = |method: &str| {
                Request::builder()
                    .method(method)
                    .uri(path.as_str())
                    .header(HOST, authority.as_str())
                    .header(AUTHORIZATION, bearer.as_str())
                    .header("x-api-key", config.adobe.client_id.as_str())
                    .header("x-gw-ims-org-id", config.adobe.org_id.as_str())
                    .header("x-sandbox-name", sandbox.as_str())
            };
            send.ready().await?;
            let read = send
                .send_request(request("GET").body(Full::new(bytes::Bytes::new()))?)
                .await?;
            statuses.push(read.status().as_u16());
            let body = read.into_body().collect().await?.to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body)?;
            let Some(etag) = body["items"][0]["etag"].as_str() else {
                bail!("no items[0].etag in the answer for {id}");
            };
            send.ready().await?;
            let written = send
                .send_request(
                    request("PATCH")
                        .header(IF_MATCH, etag)
                        .header(CONTENT_TYPE, "application/json")
                        .body(Full::new(bytes::Bytes::from(patch_body(credentials)?)))?,
                )
                .await?;
            statuses.push(written.status().as_u16());
            written.into_body().collect().await?;
        }
    };
    let mut phase = Phase::default();
    for result in futures::future::join_all((0..concurrency).map(|_| worker())).await {
        for status in result? {
            phase.requests += 1;
            *phase.statuses.entry(status).or_default() += 1;
        }
    }
    let cpu = cpu_seconds()? - cpu_before;
    Ok(phase.finish(cpu, started.elapsed()))
}

async fn run(path: PathBuf, concurrency: NonZeroUsize) -> anyhow::Result<serde_json::Value> {
    let mut config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The FlowClient phase's request gate lets this many through at once.
    config.rotation.concurrency = concurrency;
    let Some(first) = config.connections.first() else {
        bail!("{} has no [[connections]]", path.display());
    };
    // The daemon's own clients (IMS, STS cache, Flow), as `run` builds them.
    let telemetry = Arc::new(Telemetry::new());
    let options = Options {
        mode: Mode::Once,
        dry_run: false,
        only: Vec::new(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    let rotator = build_rotator(&config, &options, &telemetry, None).await?;
    let token = rotator.ims.token().await.context("IMS token")?;
    let request = StsRequest::for_connection(&config, first);
    let credentials = rotator
        .credentials
        .get(&request, None, rotator.refresh_before)
        .await
        .context("STS credentials")?;
    let http = aep_s3_rotator::remote::http::client(&config.rotation)?;
    let targets = targets(&config);

    let bare = phase(&targets, concurrency.get(), |target| {
        bare_one(&http, &config, &token, &credentials, target)
    })
    .await?;
    let flow_client = phase(&targets, concurrency.get(), |target| {
        flow_one(&rotator.flow, &token, &credentials, target)
    })
    .await?;
    let hyper_conn =
        hyper_phase(&config, &token, &credentials, &targets, concurrency.get()).await?;
    Ok(serde_json::json!({
        "connections": targets.len(),
        "concurrency": concurrency,
        "bare": bare,
        "flow_client": flow_client,
        "hyper_conn": hyper_conn,
    }))
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: http_floor CONFIG [CONCURRENCY]");
        return std::process::ExitCode::from(2);
    };
    let concurrency = match args
        .next()
        .map(|a| a.to_string_lossy().parse::<NonZeroUsize>())
    {
        None => NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("http_floor: CONCURRENCY must be a positive integer");
            return std::process::ExitCode::from(2);
        }
    };
    // The daemon's runtime: multi-threaded, one worker per core.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("http_floor: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(path, concurrency)) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("http_floor: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
