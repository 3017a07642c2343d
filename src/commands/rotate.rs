//! `rotate`: asks the running daemon, over its control socket
//! (`crate::control`), to mint fresh credentials for some or all of its
//! connections and push them now; prints one line per connection.
//!
//! What the daemon would refuse (an empty name, control characters, too
//! many names, a request longer than it reads) is refused here first, as a
//! bad command line (exit 2). Everything printed from the answer is escaped
//! and bounded (names come from Flow Service, a standby's answer through
//! the coordination table), and an answer cut short (the daemon stopped
//! mid-write) is named as such.
//!
//! Needs only `[admin] control_socket` of the config (or `--socket`): it
//! runs as root beside a systemd service, or under `kubectl exec` in the
//! daemon's container, where nothing but the config file is shared.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::cli::RotateArgs;
use crate::commands::once::plural;
use crate::control::wire::{self, WireAnswer, WireOutcome, WireRequest, WireResult};
use crate::exit::Exit;

/// How much longer than `--timeout` the client waits for the answer: a
/// standby hands the request to the leader first (`control::forward`).
const ANSWER_GRACE: Duration = Duration::from_secs(15);

/// The longest answer read: 10,000 connections of a few hundred bytes.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

pub(crate) async fn rotate(config: &Path, args: &RotateArgs) -> Exit {
    let socket = match socket(config, args) {
        Ok(socket) => socket,
        Err(exit) => return exit,
    };
    let request = WireRequest {
        version: wire::VERSION,
        all: args.all,
        connections: args.connections.clone(),
        sandboxes: args.sandboxes.clone(),
        reason: args.reason.clone(),
        timeout_ms: u64::try_from(args.timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // What the daemon would refuse is a bad command line: said here, exit 2.
    let wait = match local_check(&request) {
        Ok(wait) => wait,
        Err(message) => {
            eprintln!("aep-s3-rotator: {message}");
            return Exit::Usage;
        }
    };
    match exchange(&socket, &request, wait.saturating_add(ANSWER_GRACE)).await {
        Ok(answer) => {
            let (text, exit) = report(&answer, wait);
            // The report goes to stdout (SPEC); a refusal is an error message.
            if let WireResult::Done { .. } = answer.result {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            exit
        }
        Err(message) => {
            eprintln!("aep-s3-rotator: {message}");
            Exit::Failure
        }
    }
}

/// `--socket`, else the config's `[admin] control_socket` (or its default).
fn socket(config: &Path, args: &RotateArgs) -> Result<PathBuf, Exit> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    let setting = match crate::config::load_control_socket(config) {
        Ok(setting) => setting,
        Err(error) => {
            for issue in &error.issues {
                eprintln!("aep-s3-rotator: {}: {issue}", config.display());
            }
            return Err(Exit::Config);
        }
    };
    crate::control::socket_path(&setting).ok_or_else(|| {
        eprintln!(
            "aep-s3-rotator: {}: [admin] control_socket is \"\" (off): the daemon takes no rotate requests; remove the line (or set a path) and restart it",
            config.display()
        );
        Exit::Config
    })
}

/// The checks the daemon makes ([`WireRequest::validate`]) and the size it
/// reads, made first: a bad name is a bad command line. Answers the wait
/// the daemon will keep (`--timeout` within its bounds).
fn local_check(request: &WireRequest) -> Result<Duration, String> {
    let valid = request.validate()?;
    let size = serde_json::to_vec(request).map_or(usize::MAX, |line| line.len() + 1);
    if size > wire::MAX_REQUEST {
        return Err(format!(
            "the request is {size} bytes, more than the daemon reads ({}); name fewer connections, or use --sandbox or --all",
            wire::MAX_REQUEST
        ));
    }
    Ok(valid.wait)
}

/// Sends the request, reads the answer; the error is one line saying what to do.
async fn exchange(
    socket: &Path,
    request: &WireRequest,
    wait: Duration,
) -> Result<WireAnswer, String> {
    let shown = socket.display();
    let mut stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no control socket at {shown}: the daemon is not running, or it uses another socket (start it: `systemctl start aep-s3-rotator`; for an aep-s3-rotator@NAME instance pass --config /etc/aep-s3-rotator/NAME.toml with [admin] control_socket set, or --socket)"
        ),
        std::io::ErrorKind::ConnectionRefused => format!(
            "no daemon answers on {shown} (a socket left by a daemon that stopped): start the daemon, e.g. `systemctl start aep-s3-rotator`"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {shown}: run rotate as root (sudo) or as the daemon's user"
        ),
        _ => format!("cannot connect to the daemon's control socket {shown}: {e}"),
    })?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("cannot send the request to {shown}: {e}"))?;
    let mut answer = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_ANSWER));
    match tokio::time::timeout(wait, reader.read_until(b'\n', &mut answer)).await {
        Err(_) => {
            return Err(format!(
                "no answer from the daemon within {}; it carries on: check `aep-s3-rotator status`",
                humantime::format_duration(wait)
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot read the daemon's answer: {e}")),
        Ok(Ok(_)) => {}
    }
    if answer.is_empty() {
        return Err(format!(
            "the daemon on {shown} closed the connection without an answer (stopping, or too many clients at once); see its log, and try again"
        ));
    }
    if answer.last() != Some(&b'\n') {
        return Err(format!(
            "the daemon on {shown} closed the connection before its answer was complete (did it stop?); it may have rotated some connections: check `aep-s3-rotator status`"
        ));
    }
    serde_json::from_slice(&answer)
        .map_err(|e| format!("cannot read the daemon's answer ({e}); is it the same version?"))
}

/// Text from the answer as printed: control characters and bidi
/// overrides escaped, bounded. The answer is the daemon's, but a standby's
/// comes through the coordination table, and names come from Flow Service.
fn shown(text: &str) -> String {
    crate::scrub::bounded(text, crate::scrub::MAX_REMOTE_TEXT)
}

/// Names, each [`shown`], comma-separated.
fn listed(names: &[String]) -> String {
    names
        .iter()
        .map(|n| shown(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text to print and the exit code: 0 only when every connection was pushed.
fn report(answer: &WireAnswer, wait: Duration) -> (String, Exit) {
    let by = answer
        .replica
        .as_deref()
        .map(|r| format!(" by replica {}", shown(r)))
        .unwrap_or_default();
    match &answer.result {
        WireResult::Refused { message } => (
            format!("aep-s3-rotator: {}\n", shown(message)),
            Exit::Failure,
        ),
        WireResult::Unknown {
            connections,
            sandboxes,
        } => {
            let mut parts = Vec::new();
            if !connections.is_empty() {
                parts.push(format!("unknown connection {}", listed(connections)));
            }
            if !sandboxes.is_empty() {
                parts.push(format!("no connection in sandbox {}", listed(sandboxes)));
            }
            (
                format!(
                    "aep-s3-rotator: {}: the running daemon does not rotate it (see `aep-s3-rotator status`); nothing was rotated\n",
                    parts.join("; ")
                ),
                Exit::Usage,
            )
        }
        WireResult::Done {
            connections,
            pushed_not_listed,
            others_not_listed,
        } => {
            let mut out = String::new();
            for c in connections {
                let label = format!(
                    "{} {} ({})",
                    shown(&c.id),
                    shown(&c.name),
                    shown(&c.sandbox)
                );
                let or_dash =
                    |text: &Option<String>| text.as_deref().map_or_else(|| "-".to_owned(), shown);
                let line = match c.outcome {
                    WireOutcome::Pushed => format!(
                        "pushed   {label}: {} until {}",
                        or_dash(&c.access_key_id),
                        or_dash(&c.expires_at)
                    ),
                    WireOutcome::Refused => format!(
                        "refused  {label}: {}",
                        c.reason
                            .as_deref()
                            .map_or_else(|| "no reason given".to_owned(), shown)
                    ),
                    WireOutcome::DryRun => format!(
                        "dry-run  {label}: would push {} (the daemon runs with --dry-run)",
                        or_dash(&c.access_key_id)
                    ),
                    WireOutcome::Pending => format!(
                        "pending  {label}: not finished within {}; the daemon carries on (check `status`)",
                        humantime::format_duration(wait)
                    ),
                };
                out.push_str(&line);
                out.push('\n');
            }
            if *pushed_not_listed > 0 {
                out.push_str(&format!(
                    "pushed   {} more (not listed: the answer was too long for the coordination table)\n",
                    plural(*pushed_not_listed, "connection")
                ));
            }
            if *others_not_listed > 0 {
                out.push_str(&format!(
                    "refused  {} more, or pending (not listed: the answer was too long for the coordination table; see the leader's log and `status`)\n",
                    plural(*others_not_listed, "connection")
                ));
            }
            let count = |o: WireOutcome| connections.iter().filter(|c| c.outcome == o).count();
            let pushed = count(WireOutcome::Pushed) + pushed_not_listed;
            let total = connections.len() + pushed_not_listed + others_not_listed;
            let not_listed = if *others_not_listed > 0 {
                format!(", {others_not_listed} not listed")
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{}: {pushed} pushed, {} refused, {} pending{not_listed}{by}\n",
                plural(total, "connection"),
                count(WireOutcome::Refused) + count(WireOutcome::DryRun),
                count(WireOutcome::Pending),
            ));
            let exit = if pushed == total {
                Exit::Ok
            } else {
                Exit::Failure
            };
            (out, exit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::WireConnection;
    use crate::scheduler::RotateOutcome;

    #[test]
    fn every_connection_gets_a_line_and_only_all_pushed_exits_zero() {
        let pushed = WireConnection::new(
            "c1".into(),
            "sales".into(),
            "prod".into(),
            Some(RotateOutcome::Pushed {
                access_key_id: "ASIAFRESH1".into(),
                expires_at: std::time::SystemTime::UNIX_EPOCH,
            }),
        );
        let refused = WireConnection::new(
            "c2".into(),
            "clicks".into(),
            "dev".into(),
            Some(RotateOutcome::Refused(
                "pre-push check: AccessDenied".into(),
            )),
        );
        let answer = |connections| WireAnswer {
            version: 1,
            replica: Some("replica-2".into()),
            result: WireResult::Done {
                connections,
                pushed_not_listed: 0,
                others_not_listed: 0,
            },
        };
        let (text, exit) = report(&answer(vec![pushed.clone()]), Duration::from_secs(60));
        assert_eq!(exit, Exit::Ok);
        assert!(
            text.contains("pushed   c1 sales (prod): ASIAFRESH1 until"),
            "{text}"
        );
        assert!(
            text.ends_with("1 connection: 1 pushed, 0 refused, 0 pending by replica replica-2\n"),
            "{text}"
        );
        let (text, exit) = report(&answer(vec![pushed, refused]), Duration::from_secs(60));
        assert_eq!(exit, Exit::Failure);
        assert!(
            text.contains("refused  c2 clicks (dev): pre-push check: AccessDenied"),
            "{text}"
        );
    }

    #[test]
    fn unknown_names_are_named_and_exit_as_a_bad_command_line() {
        let answer = WireAnswer::new(WireResult::Unknown {
            connections: vec!["typo-id".into()],
            sandboxes: vec![],
        });
        let (text, exit) = report(&answer, Duration::from_secs(60));
        assert_eq!(exit, Exit::Usage);
        assert!(text.contains("unknown connection typo-id"), "{text}");
    }

    #[test]
    fn text_in_an_answer_cannot_forge_lines_or_colour_the_terminal() {
        let mut hostile = WireConnection::new(
            "c1\nrefused  c9".into(),
            "sales\u{1b}[31m\u{202e}".into(),
            "prod".into(),
            Some(RotateOutcome::Refused(
                "denied\npushed   c2 fake (prod): ASIAFAKE until never".into(),
            )),
        );
        hostile.access_key_id = Some("ASIA\r".into());
        let answer = WireAnswer {
            version: 1,
            replica: Some("leader\n5 connections: 5 pushed".into()),
            result: WireResult::Done {
                connections: vec![hostile],
                pushed_not_listed: 0,
                others_not_listed: 0,
            },
        };
        let (text, exit) = report(&answer, Duration::from_secs(60));
        assert_eq!(exit, Exit::Failure);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        let refused = WireAnswer::refused("no\u{1b}]0;title\u{7}");
        let (text, _) = report(&refused, Duration::from_secs(60));
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
        let unknown = WireAnswer::new(WireResult::Unknown {
            connections: vec!["a\u{1b}[2J".into()],
            sandboxes: vec![],
        });
        let (text, _) = report(&unknown, Duration::from_secs(60));
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            BufReader::new(&mut stream)
                .read_until(b'\n', &mut line)
                .await
                .unwrap();
            // The daemon stops halfway through its answer.
            stream
                .write_all(b"{\"version\":1,\"result\":{\"kind\":\"done\",\"connections\":[")
                .await
                .unwrap();
        });
        let request = WireRequest {
            version: 1,
            all: true,
            connections: vec![],
            sandboxes: vec![],
            reason: String::new(),
            timeout_ms: 1000,
        };
        let error = exchange(&path, &request, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(error.contains("before its answer was complete"), "{error}");
        assert!(error.contains("status"), "{error}");
    }
}
