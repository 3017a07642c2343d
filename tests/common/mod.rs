//! Shared harness for the black-box tests: an in-process simulator on
//! 127.0.0.1:0, a config file pointing at it ([`TestConfig`], the one way
//! tests write one), and the real daemon binary run as a child process
//! whose JSON log lines are collected. Every listener is bound on port 0
//! and its address read back (the daemon's admin endpoint from its log,
//! moto from its start line); every wait is [`wait_until`] or one of its
//! two twins.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aep_s3_simulator::{SimConfig, SimConnection, Simulator};
use serde_json::Value;

pub const CLIENT_ID: &str = "test-client-id";
pub const ORG_ID: &str = "0123456789ABCDEF01234567@AdobeOrg";
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/aep-s3-ingest";
/// The daemon's own (source) identity, as the AWS default chain finds it in env.
pub const SOURCE_KEY_ID: &str = "AKIATESTSOURCE000001";
pub const SOURCE_SECRET: &str = "source-identity-secret-never-printed-0001";

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_aep-s3-rotator")
}

/// A process environment with nothing from the developer's machine in it:
/// no AWS profile, no instance metadata lookups (IMDS is not on loopback),
/// JSON logs.
pub fn clean_command(binary: &str) -> Command {
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("AEP_S3_ROTATOR_LOG_FORMAT", "json")
        .stdin(Stdio::null());
    command
}

/// A simulator plus a temp dir holding the daemon's config and secret file.
pub struct Harness {
    pub sim: Simulator,
    pub sim_config: SimConfig,
    pub secret: String,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// `n` S3 connections spread over the sandboxes `prod` and `dev`.
    pub async fn start(n: usize, lifetime: Duration) -> Self {
        Self::start_with(n, lifetime, |_| {}).await
    }

    pub async fn start_with(
        n: usize,
        lifetime: Duration,
        tweak: impl FnOnce(&mut SimConfig),
    ) -> Self {
        let secret = format!("client-secret-{}", uuid::Uuid::new_v4().simple());
        let mut sim_config = SimConfig::new(CLIENT_ID, &secret, ORG_ID);
        sim_config.credential_lifetime = lifetime;
        sim_config.connections = (0..n)
            .map(|i| {
                let sandbox = if i % 2 == 0 { "prod" } else { "dev" };
                SimConnection::s3(
                    uuid::Uuid::new_v4().to_string(),
                    sandbox,
                    format!("conn-{i}"),
                )
            })
            .collect();
        tweak(&mut sim_config);
        let sim = Simulator::start(sim_config.clone())
            .await
            .expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("client-secret"), format!("{secret}\n")).unwrap();
        // 0600, as an operator should keep it (a readable one is warned about).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.path().join("client-secret"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        Self {
            sim,
            sim_config,
            secret,
            dir,
        }
    }

    /// Makes the first pass's bulk etag read fail (one scripted 503 per
    /// sandbox's list call), so each connection starts with its own `GET`:
    /// for tests about what happens on that `GET` (or on a PATCH after it).
    /// A failed bulk read never blocks a connection (tests/discovery.rs).
    pub fn without_bulk_etags(&self) {
        let sandboxes: std::collections::BTreeSet<&str> = self
            .sim_config
            .connections
            .iter()
            .map(|c| c.sandbox.as_str())
            .collect();
        for _ in sandboxes {
            self.sim
                .script_list(aep_s3_simulator::ScriptedFault::Status {
                    status: 503,
                    retry_after: None,
                    body: None,
                });
        }
    }

    pub fn connection_ids(&self) -> Vec<String> {
        self.sim_config
            .connections
            .iter()
            .map(|c| c.id.clone())
            .collect()
    }

    /// The shared config builder, pointing at this simulator with every
    /// simulated connection and [`Rotation::fast`].
    pub fn config(&self) -> TestConfig {
        TestConfig::new(self)
    }

    /// Starts the daemon with `args` after `--config <path>`.
    pub fn spawn(&self, config: &Path, args: &[&str]) -> DaemonProcess {
        spawn_daemon(config, args)
    }

    /// Every secret value that must never be printed.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = self.sim.issued_secrets();
        secrets.push(self.secret.clone());
        secrets.push(SOURCE_SECRET.to_owned());
        secrets
    }

    /// Whether every connection in `ids` has at least `n` successful
    /// PATCHes within `within` (the simulator's count).
    pub async fn rotated_at_least(&self, ids: &[String], n: u64, within: Duration) -> bool {
        wait_until(within, || {
            ids.iter()
                .all(|id| self.sim.connection(id).is_some_and(|c| c.patches >= n))
        })
        .await
    }
}

/// The `[rotation]` of a test config. Every test starts from one of two
/// presets and changes only what its rule needs, so the values a test
/// depends on are named at the test.
#[derive(Debug, Clone)]
pub struct Rotation {
    session_duration: String,
    refresh_before: String,
    jitter: String,
    concurrency: usize,
    retry_min: String,
    retry_max: String,
    request_timeout: String,
    shutdown_grace: String,
    prepush_check: Option<bool>,
    verify: Option<bool>,
    health_check_every: Option<String>,
}

impl Rotation {
    /// Rotate when the credentials have 2 s left (the simulator's
    /// lifetimes are seconds, whatever `session_duration` asks), quick
    /// retries, a 2 s request timeout, a 3 s shutdown grace.
    pub fn fast() -> Self {
        Self {
            // The shortest STS accepts; the simulator decides the real lifetime.
            session_duration: "15m".into(),
            refresh_before: "2s".into(),
            jitter: "300ms".into(),
            concurrency: 4,
            retry_min: "100ms".into(),
            retry_max: "2s".into(),
            request_timeout: "2s".into(),
            shutdown_grace: "3s".into(),
            prepush_check: None,
            verify: None,
            health_check_every: None,
        }
    }

    /// [`Rotation::fast`] with a 1 s request timeout (a scripted slow
    /// answer times out), retries capped at 1 s and 100 ms of jitter.
    pub fn quick() -> Self {
        Self::fast()
            .request_timeout("1s")
            .retry_max("1s")
            .jitter("100ms")
    }

    pub fn session_duration(mut self, value: &str) -> Self {
        value.clone_into(&mut self.session_duration);
        self
    }

    pub fn refresh_before(mut self, value: &str) -> Self {
        value.clone_into(&mut self.refresh_before);
        self
    }

    pub fn jitter(mut self, value: &str) -> Self {
        value.clone_into(&mut self.jitter);
        self
    }

    pub fn concurrency(mut self, value: usize) -> Self {
        self.concurrency = value;
        self
    }

    pub fn retry_max(mut self, value: &str) -> Self {
        value.clone_into(&mut self.retry_max);
        self
    }

    pub fn request_timeout(mut self, value: &str) -> Self {
        value.clone_into(&mut self.request_timeout);
        self
    }

    pub fn prepush_check(mut self, on: bool) -> Self {
        self.prepush_check = Some(on);
        self
    }

    pub fn verify(mut self, on: bool) -> Self {
        self.verify = Some(on);
        self
    }

    pub fn health_check_every(mut self, value: &str) -> Self {
        self.health_check_every = Some(value.to_owned());
        self
    }

    /// The body of the `[rotation]` table.
    pub fn toml(&self) -> String {
        let mut toml = format!(
            "session_duration = \"{}\"\nrefresh_before = \"{}\"\njitter = \"{}\"\nconcurrency = {}\nretry_min = \"{}\"\nretry_max = \"{}\"\nrequest_timeout = \"{}\"\nshutdown_grace = \"{}\"\n",
            self.session_duration,
            self.refresh_before,
            self.jitter,
            self.concurrency,
            self.retry_min,
            self.retry_max,
            self.request_timeout,
            self.shutdown_grace,
        );
        if let Some(on) = self.prepush_check {
            toml.push_str(&format!("prepush_check = {on}\n"));
        }
        if let Some(on) = self.verify {
            toml.push_str(&format!("verify = {on}\n"));
        }
        if let Some(every) = &self.health_check_every {
            toml.push_str(&format!("health_check_every = \"{every}\"\n"));
        }
        toml
    }
}

/// The one way tests write a daemon config: the simulator's endpoints, the
/// test client and role, a [`Rotation`], the connections, and optional
/// `[admin]`, `[state]` and further tables (`[[discover]]`,
/// `[coordination]`).
///
/// `TestConfig::new(&h).rotation(Rotation::quick()).admin().write()`
#[derive(Debug, Clone)]
pub struct TestConfig {
    dir: PathBuf,
    client_id: String,
    secret_file: PathBuf,
    adobe_lines: Vec<String>,
    ims_url: Option<String>,
    platform_url: Option<String>,
    sts_endpoint: Option<String>,
    s3_endpoint: Option<String>,
    role_arn: Option<String>,
    rotation: Option<Rotation>,
    admin: Option<String>,
    control_socket: Option<PathBuf>,
    state: Option<PathBuf>,
    tables: Vec<String>,
    connections: Vec<SimConnection>,
    file_name: String,
}

impl TestConfig {
    /// Everything of `h`'s simulator, every simulated connection, [`Rotation::fast`].
    pub fn new(h: &Harness) -> Self {
        Self {
            ims_url: Some(h.sim.ims_url()),
            platform_url: Some(h.sim.platform_url()),
            sts_endpoint: Some(h.sim.sts_url()),
            s3_endpoint: Some(h.sim.s3_url()),
            connections: h.sim_config.connections.clone(),
            rotation: Some(Rotation::fast()),
            ..Self::without_simulator(h.dir.path(), &h.dir.path().join("client-secret"))
        }
    }

    /// No simulator: Adobe's and AWS's default endpoints, the default
    /// `[rotation]`, no connections (for `coordination init`, which
    /// contacts nothing but the table).
    pub fn without_simulator(dir: &Path, secret_file: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            secret_file: secret_file.to_owned(),
            adobe_lines: Vec::new(),
            ims_url: None,
            platform_url: None,
            sts_endpoint: None,
            s3_endpoint: None,
            role_arn: Some(ROLE_ARN.to_owned()),
            rotation: None,
            admin: None,
            control_socket: None,
            state: None,
            tables: Vec::new(),
            connections: Vec::new(),
            file_name: "config.toml".to_owned(),
        }
    }

    pub fn rotation(mut self, rotation: Rotation) -> Self {
        self.rotation = Some(rotation);
        self
    }

    /// Only these `[[connections]]` (none: `&[]`).
    pub fn connections(mut self, connections: &[SimConnection]) -> Self {
        self.connections = connections.to_vec();
        self
    }

    /// `[admin] listen = "127.0.0.1:0"`: the daemon logs the port it bound
    /// ([`DaemonProcess::admin_addr`]).
    pub fn admin(self) -> Self {
        self.admin_listen("127.0.0.1:0")
    }

    /// `[admin] listen` at an exact address (one nothing listens on, say).
    pub fn admin_listen(mut self, listen: &str) -> Self {
        self.admin = Some(listen.to_owned());
        self
    }

    /// `[admin] control_socket` (the `rotate` command's socket).
    pub fn control_socket(mut self, path: &Path) -> Self {
        self.control_socket = Some(path.to_owned());
        self
    }

    pub fn state(mut self, path: &Path) -> Self {
        self.state = Some(path.to_owned());
        self
    }

    /// A further table, verbatim (`[[discover]]`, `[coordination]`).
    pub fn table(mut self, toml: &str) -> Self {
        self.tables.push(toml.to_owned());
        self
    }

    /// A further line of `[adobe]` (`scopes = [...]`).
    pub fn adobe_line(mut self, line: &str) -> Self {
        self.adobe_lines.push(line.to_owned());
        self
    }

    /// The IMS client: its id and its secret file.
    pub fn client(mut self, client_id: &str, secret_file: &Path) -> Self {
        client_id.clone_into(&mut self.client_id);
        self.secret_file = secret_file.to_owned();
        self
    }

    pub fn secret_file(mut self, path: &Path) -> Self {
        self.secret_file = path.to_owned();
        self
    }

    pub fn platform_url(mut self, url: &str) -> Self {
        self.platform_url = Some(url.to_owned());
        self
    }

    pub fn sts_endpoint(mut self, url: &str) -> Self {
        self.sts_endpoint = Some(url.to_owned());
        self
    }

    pub fn s3_endpoint(mut self, url: &str) -> Self {
        self.s3_endpoint = Some(url.to_owned());
        self
    }

    /// The default role (`None`: no role anywhere, so `GetSessionToken`).
    pub fn role_arn(mut self, role: Option<&str>) -> Self {
        self.role_arn = role.map(str::to_owned);
        self
    }

    /// The file name in the harness's directory (default `config.toml`).
    pub fn named(mut self, file_name: &str) -> Self {
        file_name.clone_into(&mut self.file_name);
        self
    }

    pub fn toml(&self) -> String {
        let line = |key: &str, value: &Option<String>| {
            value
                .as_ref()
                .map(|v| format!("{key} = \"{v}\"\n"))
                .unwrap_or_default()
        };
        let mut toml = format!(
            "[adobe]\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\norg_id = \"{ORG_ID}\"\n",
            self.client_id,
            self.secret_file.display()
        );
        toml.push_str(&line("ims_url", &self.ims_url));
        toml.push_str(&line("platform_url", &self.platform_url));
        for extra in &self.adobe_lines {
            toml.push_str(extra);
            toml.push('\n');
        }
        toml.push_str("\n[aws]\nregion = \"us-east-1\"\n");
        toml.push_str(&line("sts_endpoint", &self.sts_endpoint));
        toml.push_str(&line("s3_endpoint", &self.s3_endpoint));
        toml.push_str(&line("role_arn", &self.role_arn));
        if let Some(rotation) = &self.rotation {
            toml.push_str("\n[rotation]\n");
            toml.push_str(&rotation.toml());
        }
        if self.admin.is_some() || self.control_socket.is_some() {
            toml.push_str("\n[admin]\n");
        }
        if let Some(listen) = &self.admin {
            toml.push_str(&format!("listen = \"{listen}\"\n"));
        }
        if let Some(socket) = &self.control_socket {
            toml.push_str(&format!("control_socket = \"{}\"\n", socket.display()));
        }
        if let Some(path) = &self.state {
            toml.push_str(&format!("\n[state]\npath = \"{}\"\n", path.display()));
        }
        for table in &self.tables {
            toml.push('\n');
            toml.push_str(table);
            toml.push('\n');
        }
        for c in &self.connections {
            toml.push_str(&format!(
                "\n[[connections]]\nid = \"{}\"\nsandbox = \"{}\"\nname = \"{}\"\n",
                c.id, c.sandbox, c.name
            ));
        }
        toml
    }

    /// Writes the file (replacing it) and answers its path.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.join(&self.file_name);
        std::fs::write(&path, self.toml()).unwrap();
        path
    }
}

/// The daemon as a child process; stdout and stderr collected line by line.
pub struct DaemonProcess {
    pub child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    stream: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    })
}

impl DaemonProcess {
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("daemon starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stderr.take().unwrap(), Arc::clone(&stderr)),
            collect(child.stdout.take().unwrap(), Arc::clone(&stdout)),
        ];
        Self {
            child,
            stderr,
            stdout,
            readers,
        }
    }

    /// Stderr lines parsed as JSON; a line that is not JSON fails the test
    /// (SPEC: one JSON object per line).
    pub fn logs(&self) -> Vec<Value> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// Log lines with this exact message.
    pub fn events(&self, message: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"] == message)
            .collect()
    }

    /// The `error` field of each log line with this exact message.
    pub fn errors(&self, message: &str) -> Vec<String> {
        self.events(message)
            .iter()
            .filter_map(|e| e["error"].as_str().map(str::to_owned))
            .collect()
    }

    /// Sends SIGHUP and waits up to 10 s for `config reloaded` (panics,
    /// with stderr, if it does not come).
    pub async fn reload(&self) {
        self.signal("HUP");
        assert!(
            wait_until(Duration::from_secs(10), || !self
                .events("config reloaded")
                .is_empty())
            .await,
            "no reload; stderr:\n{}",
            self.stderr_text()
        );
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Sends a signal by name (`TERM`, `HUP`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit on its own (bounded).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        let mut status = None;
        wait_until_blocking(timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let Some(status) = status else {
            let _ = self.child.kill();
            panic!(
                "daemon did not exit within {timeout:?}; stderr:\n{}",
                self.stderr_text()
            );
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// The address the admin endpoint bound, as the daemon logs it
    /// (`admin endpoint listening`, field `listen`, in JSON or text logs):
    /// configs ask for port 0.
    pub async fn admin_addr(&self) -> SocketAddr {
        let mut addr = None;
        wait_until(Duration::from_secs(20), || {
            addr = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("admin endpoint listening"))
                .find_map(|l| logged_listen(l));
            addr.is_some()
        })
        .await;
        addr.unwrap_or_else(|| panic!("no admin address logged; stderr:\n{}", self.stderr_text()))
    }

    /// SIGTERM, then wait.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(15))
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `listen` field of a log line: JSON (`"listen":"ADDR"`) or text
/// (`listen=ADDR`).
fn logged_listen(line: &str) -> Option<SocketAddr> {
    if let Ok(json) = serde_json::from_str::<Value>(line) {
        return json["listen"].as_str()?.parse().ok();
    }
    line.split("listen=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How often the wait helpers look: short against the waits they replace,
/// long enough not to load the machine the daemon runs on.
pub const POLL: Duration = Duration::from_millis(50);

/// Waits until `condition` holds, looking every [`POLL`]; false if it still
/// does not after `timeout`. The one way tests wait for something.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    wait_until_async(timeout, async || condition()).await
}

/// [`wait_until`] for a condition that has to await (an HTTP request).
pub async fn wait_until_async(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    condition().await
}

/// [`wait_until`] for code that cannot await (a child process's exit, a
/// `Drop`): the same interval, blocking the thread.
pub fn wait_until_blocking(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    condition()
}

/// The `timestamp` of a JSON log line.
pub fn log_time(line: &Value) -> SystemTime {
    let text = line["timestamp"]
        .as_str()
        .expect("log line has a timestamp");
    humantime::parse_rfc3339_weak(text)
        .unwrap_or_else(|e| panic!("timestamp {text:?} is not RFC 3339: {e}"))
}

/// Unix milliseconds of `t` (the simulator's PATCH log unit).
pub fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// Asserts no secret value appears anywhere in `text`.
pub fn assert_no_secret(text: &str, secrets: &[String]) {
    assert!(
        !secrets.is_empty(),
        "no secrets to look for: the search would prove nothing"
    );
    for secret in secrets {
        assert!(
            secret.len() >= 8,
            "secret too short to search for meaningfully"
        );
        assert!(
            !text.contains(secret.as_str()),
            "a secret value was printed: {}...",
            &secret[..6]
        );
    }
}

/// `moto_server` on a loopback port it chose; killed on drop.
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `moto_server` executable (`AEP_S3_ROTATOR_MOTO_SERVER`, set by
/// `scripts/test.sh`): without it a moto test fails, never skips.
pub fn moto_server() -> String {
    std::env::var("AEP_S3_ROTATOR_MOTO_SERVER").unwrap_or_else(|_| {
        panic!("AEP_S3_ROTATOR_MOTO_SERVER is not set: run the suite with scripts/test.sh, which installs moto[server] into .venv")
    })
}

/// Runs `tests/support/<script>` with `args` on the venv's Python (beside
/// `moto_server`); its stdout, parsed as JSON.
pub fn run_moto_setup<T: serde::de::DeserializeOwned>(script: &str, args: &[&str]) -> T {
    let python = Path::new(&moto_server()).with_file_name("python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script);
    let output = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "moto setup {} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Starts the daemon binary with `args` after `--config <config>`, with the
/// tests' AWS source identity.
pub fn spawn_daemon(config: &Path, args: &[&str]) -> DaemonProcess {
    let mut command = clean_command(binary());
    command
        .env("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        .arg("--config")
        .arg(config)
        .args(args);
    DaemonProcess::spawn(command)
}

/// The `status` command against a daemon whose config asks for port 0:
/// the address it bound overrides `[admin] listen`, as an operator's
/// `AEP_S3_ROTATOR__ADMIN__LISTEN` would.
pub fn status_command(config: &Path, admin: SocketAddr) -> Command {
    let mut command = clean_command(binary());
    command
        .env("AEP_S3_ROTATOR__ADMIN__LISTEN", admin.to_string())
        .arg("--config")
        .arg(config)
        .arg("status");
    command
}

impl Moto {
    /// Starts moto ([`moto_server`]) on `127.0.0.1:0` and reads the port it
    /// bound from its start line (` * Running on http://127.0.0.1:PORT`,
    /// printed once the socket listens).
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// [`Moto::start`] with more environment (`MOTO_ENABLE_RECORDING`, say).
    pub fn start_with_env(env: &[(&str, &Path)]) -> Self {
        let server = moto_server();
        let mut child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto_server at {server}: {e}"));
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads on past the start line: moto logs every request to stderr,
        // and a full pipe would stall it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = moto_listening(&line) {
                    let _ = tx.send(addr);
                }
            }
        });
        // Generous: several Python interpreters start at once under nextest.
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| {
                let _ = child.kill();
                panic!(
                    "moto_server named no listening port within 60 s ({e}); exit: {:?}",
                    child.try_wait()
                )
            });
        Self { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The address in Werkzeug's ` * Running on http://127.0.0.1:PORT` line.
fn moto_listening(line: &str) -> Option<SocketAddr> {
    let rest = line.split("Running on http://").nth(1)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
