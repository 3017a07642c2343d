//! `once`: rotate every configured (or chosen) connection now, print one
//! line each, exit 0 only if all were rotated.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::start_membership;
use crate::cli::OnceArgs;
use crate::clock::rfc3339;
use crate::config::Config;
use crate::exit::Exit;
use crate::observe::notify::Notifier;
use crate::observe::telemetry::Telemetry;
use crate::remote::sts::SourceIdentity;
use crate::scheduler::{Daemon, Mode, Options, Parts, Report};

pub(crate) async fn once(config: Config, args: OnceArgs) -> Exit {
    let telemetry = Arc::new(Telemetry::new());
    let mut options = Options {
        mode: Mode::Once,
        dry_run: args.dry_run,
        only: args.connections.clone(),
        identity: SourceIdentity::DefaultChain,
        fence: None,
    };
    // Without rules a wrong --connection is known before any request.
    if config.discover.is_empty()
        && let Err(exit) = chosen_connections(&config, &args.connections)
    {
        return exit;
    }
    if config.coordination.is_some() {
        tracing::warn!(
            "`once` does not take the [coordination] lease: it writes even while a leader runs. \
             The etag (If-Match) keeps the two from mixing credentials, but run `once` only \
             where you mean to override the leader"
        );
    }
    // `once` honours the rules: the connections they match now are rotated too.
    let Some((config, rotator, membership)) = start_membership(&config, &options, &telemetry).await
    else {
        return Exit::Failure;
    };
    options.only = match chosen_connections(&config, &args.connections) {
        Ok(ids) => ids,
        Err(exit) => return exit,
    };
    let cancel = CancellationToken::new();
    // SIGTERM/SIGINT stop `once` too; it never reloads.
    if let Err(error) = crate::shutdown::listen(cancel.clone()) {
        tracing::error!(error = %error, "cannot install signal handlers");
        return Exit::Failure;
    }
    let (_no_reloads, reloads) = mpsc::channel(1);
    let mut daemon = Daemon::new(Parts::real(
        config,
        options,
        telemetry,
        Notifier::default(),
        rotator,
    ));
    daemon.seed_s3_targets(&membership.targets);
    daemon.seed_etags(&membership.etags);
    match daemon.run(cancel.clone(), reloads).await {
        Ok(report) => {
            print!("{}", once_report(&report, args.dry_run));
            if cancel.is_cancelled() || !report.all_ok() {
                Exit::Failure
            } else {
                Exit::Ok
            }
        }
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "stopped on an error");
            Exit::Failure
        }
    }
}

/// `once --connection ID|NAME`: the ids of the connections chosen, each
/// argument a configured (or discovered) id or a name that only one of them
/// has (names are what logs and reports show; AEP does not keep them unique).
pub(crate) fn chosen_connections(config: &Config, chosen: &[String]) -> Result<Vec<String>, Exit> {
    let mut ids = Vec::with_capacity(chosen.len());
    let mut problems = Vec::new();
    for wanted in chosen {
        if config.connections.iter().any(|c| &c.id == wanted) {
            ids.push(wanted.clone());
            continue;
        }
        let named: Vec<&str> = config
            .connections
            .iter()
            .filter(|c| &c.name == wanted)
            .map(|c| c.id.as_str())
            .collect();
        match named.as_slice() {
            [id] => ids.push((*id).to_owned()),
            [] => problems.push(format!(
                "{} is neither the id nor the name of a connection",
                crate::remote::http::bounded(wanted, 200)
            )),
            many => problems.push(format!(
                "{} names {} connections ({}); give the id instead",
                crate::remote::http::bounded(wanted, 200),
                many.len(),
                many.join(", ")
            )),
        }
    }
    if problems.is_empty() {
        return Ok(ids);
    }
    let mut known: Vec<String> = config
        .connections
        .iter()
        .map(|c| format!("{} ({})", c.id, c.name))
        .collect();
    known.sort();
    eprintln!(
        "aep-s3-rotator: --connection {}; known: {}",
        problems.join("; "),
        known.join(", ")
    );
    Err(Exit::Usage)
}

/// One line per connection: `ok`/`FAIL`, name, sandbox, access key id and
/// expiry or the error.
pub fn once_report(report: &Report, dry_run: bool) -> String {
    let mut out = String::new();
    for c in &report.connections {
        match &c.last_error {
            None if dry_run => out.push_str(&format!(
                "ok    {} ({}): dry run, nothing changed\n",
                c.name(),
                c.sandbox()
            )),
            None => out.push_str(&format!(
                "ok    {} ({}): {} until {}\n",
                c.name(),
                c.sandbox(),
                c.access_key_id.as_deref().unwrap_or("-"),
                c.expires_at.map(rfc3339).unwrap_or_else(|| "-".to_owned())
            )),
            Some(error) => {
                out.push_str(&format!("FAIL  {} ({}): {error}\n", c.name(), c.sandbox()))
            }
        }
    }
    let failed = report
        .connections
        .iter()
        .filter(|c| c.last_error.is_some())
        .count();
    out.push_str(&format!(
        "{}, {} ok, {failed} failed\n",
        plural(report.connections.len(), "connection"),
        report.connections.len() - failed
    ));
    out
}

/// `1 connection`, `2 connections`; `sandbox` → `sandboxes`.
pub fn plural(n: usize, noun: &str) -> String {
    match (n, noun.ends_with('x')) {
        (1, _) => format!("{n} {noun}"),
        (_, true) => format!("{n} {noun}es"),
        (_, false) => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(connections: &[(&str, &str, &str)]) -> Config {
        let mut text = String::from(
            "[adobe]\nclient_id = \"cid\"\nclient_secret = \"s\"\norg_id = \"0123456789ABCDEF01234567@AdobeOrg\"\n\
             [aws]\nrole_arn = \"arn:aws:iam::123456789012:role/aep\"\n",
        );
        for (id, sandbox, name) in connections {
            text.push_str(&format!(
                "[[connections]]\nid = \"{id}\"\nsandbox = \"{sandbox}\"\nname = \"{name}\"\n"
            ));
        }
        Config::from_toml_str(&text, Vec::new()).unwrap()
    }

    #[test]
    fn once_chooses_connections_by_id_or_by_a_name_only_one_has() {
        // Names are unique within a sandbox only.
        let config = config(&[
            ("c-1", "prod", "sales"),
            ("c-2", "prod", "clicks"),
            ("c-3", "dev", "clicks"),
        ]);
        let chosen = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            chosen_connections(&config, &args)
        };
        assert_eq!(
            chosen(&["c-2", "sales"]).ok(),
            Some(vec!["c-2".to_owned(), "c-1".to_owned()])
        );
        // An id wins over a name; a shared name and an unknown one are refused.
        assert!(chosen(&["clicks"]).is_err());
        assert!(chosen(&["nothing"]).is_err());
        assert_eq!(chosen(&[]).ok(), Some(Vec::new()));
    }

    #[test]
    fn counts_are_pluralised() {
        assert_eq!(plural(1, "connection"), "1 connection");
        assert_eq!(plural(0, "connection"), "0 connections");
        assert_eq!(plural(2, "sandbox"), "2 sandboxes");
        assert_eq!(plural(1, "discover rule"), "1 discover rule");
    }
}
