//! Shared harness for the black-box tests: an in-process simulator on
//! 127.0.0.1:0, a config file pointing at it, and the real daemon binary run
//! as a child process whose JSON log lines are collected.

// Black-box tests drive the real binary in real time: they read the real clocks.
#![allow(
    dead_code,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

    /// Writes `config.toml`; `rotation` replaces the default `[rotation]`
    /// body, `extra` is appended verbatim (e.g. `[admin]`, `[state]`).
    pub fn write_config(&self, rotation: &str, extra: &str) -> PathBuf {
        self.write_config_with_connections(rotation, extra, &self.sim_config.connections)
    }

    pub fn write_config_with_connections(
        &self,
        rotation: &str,
        extra: &str,
        connections: &[SimConnection],
    ) -> PathBuf {
        let mut toml = format!(
            r#"[adobe]
client_id = "{CLIENT_ID}"
client_secret_file = "{secret_file}"
org_id = "{ORG_ID}"
ims_url = "{ims}"
platform_url = "{flow}"

[aws]
region = "us-east-1"
sts_endpoint = "{sts}"
s3_endpoint = "{s3}"
role_arn = "{ROLE_ARN}"

[rotation]
{rotation}

{extra}
"#,
            secret_file = self.dir.path().join("client-secret").display(),
            ims = self.sim.ims_url(),
            flow = self.sim.platform_url(),
            sts = self.sim.sts_url(),
            s3 = self.sim.s3_url(),
        );
        for c in connections {
            toml.push_str(&format!(
                "\n[[connections]]\nid = \"{}\"\nsandbox = \"{}\"\nname = \"{}\"\n",
                c.id, c.sandbox, c.name
            ));
        }
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        path
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
}

/// A quick `[rotation]` for tests: credentials of a few seconds.
pub const FAST_ROTATION: &str = r#"session_duration = "15m"
refresh_before = "2s"
jitter = "300ms"
concurrency = 4
retry_min = "100ms"
retry_max = "2s"
request_timeout = "2s"
shutdown_grace = "3s""#;

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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "daemon did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition()
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

/// `moto_server` on a free loopback port; killed on drop.
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

impl Moto {
    /// Starts moto ([`moto_server`]) and waits until it listens.
    pub fn start() -> Self {
        let server = moto_server();
        // Ask the OS for a free port, then hand it to moto (it cannot report one).
        let port = free_port();
        let mut child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto_server at {server}: {e}"));
        // Generous: five Python interpreters start at once under nextest.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
