//! Discovery: rules, listings and the streamed start, against scripted listers.

use std::sync::Mutex;

use super::*;
use crate::remote::flow::{ACCESS_KEY_AUTH_SPEC, S3_CONNECTION_SPEC_ID};

const ROLE_A: &str = "arn:aws:iam::123456789012:role/a";
const ROLE_B: &str = "arn:aws:iam::123456789012:role/b";

fn config(rules: &str, connections: &str) -> Config {
    let text = format!(
        r#"[adobe]
client_id = "cid"
client_secret = "not-a-real-secret"
org_id = "0123456789ABCDEF01234567@AdobeOrg"
[aws]
role_arn = "{ROLE_A}"
{connections}
{rules}"#
    );
    Config::from_toml_str(&text, Vec::new()).unwrap()
}

fn item(id: &str, name: &str, description: &str) -> ListedConnection {
    ListedConnection {
        id: id.to_owned(),
        etag: format!("\"etag-{id}\""),
        name: Some(name.to_owned()),
        description: Some(description.to_owned()),
        auth_spec: Some(ACCESS_KEY_AUTH_SPEC.to_owned()),
        state: Some("enabled".to_owned()),
        connection_spec_id: Some(S3_CONNECTION_SPEC_ID.to_owned()),
        s3: None,
    }
}

/// A fake Flow Service: items per sandbox, a switch to fail a sandbox,
/// and a log of the calls.
#[derive(Default)]
struct FakeLister {
    items: Mutex<BTreeMap<String, Vec<ListedConnection>>>,
    failing: Mutex<HashSet<String>>,
    /// Sandboxes whose paged listing fails after this many pages.
    fail_after_pages: Mutex<HashMap<String, usize>>,
    /// Sandboxes whose listing yields this many times first (answers
    /// later than the others).
    slow: Mutex<HashMap<String, usize>>,
    calls: Mutex<Vec<(String, Vec<PropertyFilter>)>>,
}

impl FakeLister {
    fn put(&self, sandbox: &str, items: Vec<ListedConnection>) {
        self.items.lock().unwrap().insert(sandbox.to_owned(), items);
    }
    fn fail(&self, sandbox: &str, fail: bool) {
        let mut failing = self.failing.lock().unwrap();
        if fail {
            failing.insert(sandbox.to_owned());
        } else {
            failing.remove(sandbox);
        }
    }
    fn calls(&self) -> Vec<(String, Vec<PropertyFilter>)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Lister for Arc<FakeLister> {
    async fn list(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        _limit: u32,
    ) -> Result<Vec<ListedConnection>, ListError> {
        self.calls
            .lock()
            .unwrap()
            .push((sandbox.to_owned(), filters.to_vec()));
        if self.failing.lock().unwrap().contains(sandbox) {
            return Err(ListError::Flow(FlowError::Throttled {
                status: 429,
                retry_after: None,
            }));
        }
        let all = self
            .items
            .lock()
            .unwrap()
            .get(sandbox)
            .cloned()
            .unwrap_or_default();
        Ok(all
            .into_iter()
            .filter(|i| {
                filters.iter().all(|f| {
                    let value = match f.path.as_str() {
                        "id" => Some(i.id.clone()),
                        "connectionSpec.id" => i.connection_spec_id.clone(),
                        _ => None,
                    };
                    value.is_some_and(|v| f.values.contains(&v))
                })
            })
            .collect())
    }

    /// Pages of `limit` items, as Flow Service would answer them.
    async fn list_pages(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
        on_page: &mut (dyn FnMut(&[ListedConnection]) + Send),
    ) -> Result<Vec<ListedConnection>, ListError> {
        let yields = self.slow.lock().unwrap().get(sandbox).copied();
        for _ in 0..yields.unwrap_or(0) {
            tokio::task::yield_now().await;
        }
        let items = self.list(sandbox, filters, limit).await?;
        if items.is_empty() {
            on_page(&[]);
        }
        let fail_after = self.fail_after_pages.lock().unwrap().get(sandbox).copied();
        for (n, page) in items.chunks(limit.max(1) as usize).enumerate() {
            if fail_after == Some(n) {
                return Err(ListError::Flow(FlowError::Throttled {
                    status: 429,
                    retry_after: None,
                }));
            }
            on_page(page);
        }
        Ok(items)
    }
}

fn ids(m: &Membership) -> Vec<&str> {
    m.connections.iter().map(|c| c.id.as_str()).collect()
}

const TAG_RULE: &str = r#"
[[discover]]
sandboxes = ["prod"]
description_tag = "rotate:aep-s3"
every = "1m"
"#;

#[test]
fn a_rule_needs_every_condition_and_a_rotatable_s3_connection() {
    let config = config(
        r#"
[[discover]]
sandboxes = ["prod"]
name = "ingest-*"
description_tag = "rotate:aep-s3"
"#,
        "",
    );
    let rule = &config.discover[0];
    let good = item("a", "ingest-sales", "team x; rotate:aep-s3");
    assert!(matches(rule, "prod", &good));
    assert!(!matches(rule, "dev", &good), "wrong sandbox");
    assert!(!matches(
        rule,
        "prod",
        &item("a", "egress-sales", "rotate:aep-s3")
    ));
    assert!(!matches(rule, "prod", &item("a", "ingest-sales", "no tag")));
    let mut disabled = good.clone();
    disabled.state = Some("disabled".to_owned());
    assert!(!matches(rule, "prod", &disabled));
    let mut role_based = good.clone();
    role_based.auth_spec = Some("IAMRole Based".to_owned());
    assert!(!matches(rule, "prod", &role_based));
    let mut other_spec = good.clone();
    other_spec.connection_spec_id = Some("other".to_owned());
    assert!(!matches(rule, "prod", &other_spec));
    let mut nameless = good.clone();
    nameless.name = None;
    assert!(!matches(rule, "prod", &nameless));
    let mut unconditional = rule.clone();
    unconditional.name = None;
    unconditional.description_tag = None;
    assert!(!matches(&unconditional, "prod", &good));
}

#[test]
fn explicit_wins_and_different_identities_conflict() {
    let config = config(
        &format!(
            r#"
[[discover]]
sandboxes = ["prod"]
description_tag = "rotate"
[[discover]]
sandboxes = ["prod"]
name = "ingest-*"
role_arn = "{ROLE_B}"
[[discover]]
sandboxes = ["prod"]
name = "*-sales"
"#
        ),
        r#"[[connections]]
id = "explicit"
sandbox = "prod"
role_arn = "arn:aws:iam::123456789012:role/b"
"#,
    );
    let listing = SandboxListing {
        items: vec![
            item("explicit", "ingest-x", "rotate"),
            item("both", "ingest-y", "rotate"),
            item("same", "plain-sales", "rotate"),
            item("one", "ingest-z", ""),
        ],
    };
    let m = resolve_listings(&config, BTreeMap::from([("prod".to_owned(), listing)]));
    assert_eq!(ids(&m), ["explicit", "one", "same"]);
    assert_eq!(m.connections[0].origin, Origin::Explicit);
    let one = &m.connections[1];
    assert_eq!(one.origin, Origin::Rule(1));
    assert_eq!(one.role_arn.as_ref().unwrap().as_str(), ROLE_B);
    assert_eq!(one.name, "ingest-z");
    // Rules 0 and 2 agree (the [aws] role): the first names it.
    assert_eq!(m.connections[2].origin, Origin::Rule(0));
    assert_eq!(m.conflicts.len(), 1);
    assert_eq!(m.conflicts[0].id, "both");
    assert_eq!(m.conflicts[0].rules, [0, 1]);
    assert_eq!(m.etags.get("one").unwrap(), "\"etag-one\"");
    assert!(!m.etags.contains_key("both"));
}

/// A listing that never ends but always progresses: a page of one new
/// item every second.
struct EndlessLister;

impl Lister for EndlessLister {
    async fn list(
        &self,
        _sandbox: &str,
        _filters: &[PropertyFilter],
        _limit: u32,
    ) -> Result<Vec<ListedConnection>, ListError> {
        std::future::pending().await
    }

    async fn list_pages(
        &self,
        _sandbox: &str,
        _filters: &[PropertyFilter],
        _limit: u32,
        on_page: &mut (dyn FnMut(&[ListedConnection]) + Send),
    ) -> Result<Vec<ListedConnection>, ListError> {
        for n in 0u64.. {
            tokio::time::sleep(Duration::from_secs(1)).await;
            on_page(&[item(&format!("p{n}"), "n", "rotate:aep-s3")]);
        }
        Ok(Vec::new())
    }
}

#[tokio::test(start_paused = true)]
async fn the_start_listing_is_bounded_in_time() {
    // Issue 26 #10: an endless but progressing listing held READY for
    // up to 1,000 request timeouts.
    let config = config(
        TAG_RULE,
        "[[connections]]\nid = \"e\"\nsandbox = \"prod\"\n",
    );
    let budget = start_listing_budget(&config);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = crate::clock::mono_now();
    let streamed = tokio::time::timeout(
        Duration::from_secs(8 * 3600),
        resolve_streaming(&config, &EndlessLister, &tx),
    )
    .await
    .expect("the start's listing ends");
    assert!(
        started.elapsed() <= budget + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(streamed.membership.failures.len(), 1);
    // What the pages brought stays (the daemon has it).
    assert!(streamed.membership.discovered().count() >= 25);
    assert!(matches!(rx.try_recv(), Ok(Intake::Found { .. })));
}

#[test]
fn description_tags_match_whole_words_only() {
    // Issue 26 #10: a substring test let `do-not-rotate:aep-s3` match.
    let config = config(TAG_RULE, "");
    let rule = &config.discover[0];
    for (description, expected) in [
        ("rotate:aep-s3", true),
        ("team sales; rotate:aep-s3, owner x", true),
        ("(rotate:aep-s3)", true),
        ("ends the sentence rotate:aep-s3.", true),
        ("do-not-rotate:aep-s3", false),
        ("rotate:aep-s3-old", false),
        ("xrotate:aep-s3", false),
        ("rotate:aep-s3.v2", false),
        ("", false),
    ] {
        let c = item("i", "n", description);
        assert_eq!(matches(rule, "prod", &c), expected, "{description:?}");
    }
}

#[tokio::test]
async fn resolve_reads_explicit_etags_in_chunks_and_keeps_a_failed_sandbox() {
    let explicit: String = (0..(ID_CHUNK + 5))
        .map(|n| format!("[[connections]]\nid = \"x{n}\"\nsandbox = \"dev\"\n"))
        .collect();
    let config = config(TAG_RULE, &explicit);
    let lister = Arc::new(FakeLister::default());
    lister.put(
        "prod",
        vec![item("p1", "a", "rotate:aep-s3"), item("p2", "b", "")],
    );
    lister.put(
        "dev",
        (0..(ID_CHUNK + 5))
            .map(|n| item(&format!("x{n}"), "n", ""))
            .collect(),
    );
    let first = resolve(&config, &lister, None, None).await;
    assert_eq!(first.discovered().count(), 1);
    assert_eq!(
        first.etags.len(),
        ID_CHUNK + 5 + 1,
        "every connection has its etag"
    );
    let calls = lister.calls();
    assert_eq!(
        calls.len(),
        3,
        "one rule listing and two id chunks: {calls:?}"
    );
    assert_eq!(calls[0].1, [PropertyFilter::s3()]);
    assert_eq!(calls[1].1[0].values.len(), ID_CHUNK);

    // prod fails: p1 stays, even though the listing now says otherwise.
    lister.put("prod", vec![]);
    lister.fail("prod", true);
    let second = resolve(&config, &lister, Some(&first), None).await;
    assert_eq!(second.failures.len(), 1);
    assert!(second.connections.iter().any(|c| c.id == "p1"));
    assert!(!second.differs_from(&first));

    // prod answers again, without p1: now it goes.
    lister.fail("prod", false);
    let third = resolve(&config, &lister, Some(&second), None).await;
    assert!(third.failures.is_empty());
    assert!(!third.connections.iter().any(|c| c.id == "p1"));
    assert!(log_changes(&second, &third));

    // A periodic re-list of prod lists prod only, no explicit ids.
    let calls = lister.calls().len();
    let due = BTreeSet::from(["prod".to_owned()]);
    let fourth = resolve(&config, &lister, Some(&third), Some(&due)).await;
    assert_eq!(lister.calls().len(), calls + 1);
    assert!(!fourth.differs_from(&third));
}

#[tokio::test]
async fn without_rules_explicit_ids_are_listed_with_their_targets() {
    let explicit = "[[connections]]\nid = \"e1\"\nsandbox = \"dev\"\n\
                    [[connections]]\nid = \"e2\"\nsandbox = \"dev\"\n\
                    [[connections]]\nid = \"e3\"\nsandbox = \"prod\"\n";
    let config = config("", explicit);
    let lister = Arc::new(FakeLister::default());
    let target = S3Target {
        bucket: "sales".to_owned(),
        folder: Some("/landing".to_owned()),
        service_url: None,
    };
    let mut e1 = item("e1", "one", "");
    e1.s3 = Some(target.clone());
    lister.put("dev", vec![e1, item("e2", "two", "")]);
    lister.fail("prod", true);
    let m = resolve(&config, &lister, None, None).await;
    // One id chunk per sandbox, nothing else (no rule, no sandbox listing).
    let calls = lister.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.iter().all(|(_, f)| f[0].path == "id"), "{calls:?}");
    assert_eq!(m.connections.len(), 3);
    assert_eq!(m.etags.get("e1").map(String::as_str), Some("\"etag-e1\""));
    assert_eq!(m.etags.get("e2").map(String::as_str), Some("\"etag-e2\""));
    // prod's listing failed: e3 is kept, and just has no etag (one GET).
    assert!(!m.etags.contains_key("e3"));
    assert_eq!(m.targets.get("e1"), Some(&target));
    assert!(
        !m.targets.contains_key("e2"),
        "no bucket listed, none made up"
    );
}

#[tokio::test(start_paused = true)]
async fn run_discovery_relists_every_period_and_sends_changes_only() {
    let config = config(TAG_RULE, "");
    let lister = Arc::new(FakeLister::default());
    lister.put("prod", vec![item("p1", "a", "rotate:aep-s3")]);
    let initial = resolve(&config, &lister, None, None).await;
    assert_eq!(ids(&initial), ["p1"]);
    let (tx, mut rx) = mpsc::channel(4);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_discovery(
        Arc::new(config),
        Arc::clone(&lister),
        Arc::new(initial),
        tx,
        None,
        cancel.clone(),
    ));

    // Nothing changes for two periods: nothing is sent, but it re-lists.
    tokio::time::sleep(Duration::from_secs(125)).await;
    assert!(rx.try_recv().is_err());
    assert_eq!(lister.calls().len(), 3, "initial + 2 re-lists");

    // A new tagged connection: sent within one period.
    lister.put(
        "prod",
        vec![
            item("p1", "a", "rotate:aep-s3"),
            item("p2", "b", "rotate:aep-s3"),
        ],
    );
    let started = crate::clock::mono_now();
    let m = rx.recv().await.unwrap();
    assert!(started.elapsed() <= Duration::from_secs(60));
    assert_eq!(ids(&m), ["p1", "p2"]);

    // Throttled: nothing dropped, nothing sent.
    lister.put("prod", vec![]);
    lister.fail("prod", true);
    tokio::time::sleep(Duration::from_secs(130)).await;
    assert!(rx.try_recv().is_err());

    // Answering again without p1 (untagged now): p1 is dropped.
    lister.fail("prod", false);
    lister.put("prod", vec![item("p2", "b", "rotate:aep-s3")]);
    let m = rx.recv().await.unwrap();
    assert_eq!(ids(&m), ["p2"]);

    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_streaming_start_sends_each_page_and_chunk_and_answers_what_resolve_does() {
    let mut explicit: String = (0..(ID_CHUNK + 5))
        .map(|n| format!("[[connections]]\nid = \"x{n}\"\nsandbox = \"dev\"\n"))
        .collect();
    explicit.push_str("[[connections]]\nid = \"e\"\nsandbox = \"prod\"\n");
    let config = config(TAG_RULE, &explicit);
    let lister = Arc::new(FakeLister::default());
    // prod: the explicit one (tagged, but explicit wins) then 250 more,
    // every other one tagged: pages of 100, 100 and 51.
    let mut prod = vec![item("e", "explicit", "rotate:aep-s3")];
    prod.extend((0..250).map(|n| {
        let tag = if n % 2 == 0 { "rotate:aep-s3" } else { "" };
        item(&format!("p{n:03}"), "n", tag)
    }));
    lister.put("prod", prod);
    lister.put(
        "dev",
        (0..(ID_CHUNK + 5))
            .map(|n| item(&format!("x{n}"), "n", ""))
            .collect(),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let streamed = resolve_streaming(&config, &lister, &tx).await;
    let streamed_calls = lister.calls();
    let mut sent = Vec::new();
    while let Ok(intake) = rx.try_recv() {
        sent.push(intake);
    }
    let shape: Vec<(usize, usize)> = sent
        .iter()
        .map(|i| match i {
            Intake::Found { added, etags, .. } => (added.len(), etags.len()),
            Intake::Done => (usize::MAX, 0),
        })
        .collect();
    // dev's two id chunks (no rule there), then prod's three pages:
    // its first page carries the explicit one's etag too.
    assert_eq!(shape, [(0, ID_CHUNK), (0, 5), (50, 51), (50, 50), (25, 25)]);
    let Intake::Found { added, etags, .. } = &sent[2] else {
        panic!("{:?}", sent[2]);
    };
    assert_eq!(added[0].id, "p000");
    assert_eq!(etags.get("e").map(String::as_str), Some("\"etag-e\""));
    assert!(added.iter().all(|c| c.id != "e"), "explicit wins");

    // The same requests and the same membership as `resolve`.
    let again = Arc::new(FakeLister::default());
    for sandbox in ["prod", "dev"] {
        let items = lister.items.lock().unwrap().get(sandbox).cloned().unwrap();
        again.put(sandbox, items);
    }
    let full = resolve(&config, &again, None, None).await;
    // The etags and targets went to the daemon page by page (above): the
    // membership keeps only their count.
    assert_eq!(streamed.etags, full.etags.len());
    assert_eq!(
        streamed.membership,
        Membership {
            etags: HashMap::new(),
            targets: HashMap::new(),
            ..full.clone()
        }
    );
    assert!(streamed.exact());
    // Everything discovered was announced page by page: the final log
    // has nothing left to say.
    assert!(streamed.announced.connections.iter().eq(full.discovered()));
    assert!(
        !streamed.membership.differs_from(&Membership {
            connections: config
                .connections
                .iter()
                .cloned()
                .chain(streamed.announced.connections.iter().cloned())
                .collect(),
            ..Membership::default()
        })
    );
    let sorted = |calls: Vec<(String, Vec<PropertyFilter>)>| {
        let mut calls: Vec<String> = calls.iter().map(|c| format!("{c:?}")).collect();
        calls.sort();
        calls
    };
    assert_eq!(sorted(streamed_calls), sorted(again.calls()));
    let added: BTreeSet<&str> = sent
        .iter()
        .flat_map(|i| match i {
            Intake::Found { added, .. } => added.iter().map(|c| c.id.as_str()).collect(),
            Intake::Done => Vec::new(),
        })
        .collect();
    let discovered: BTreeSet<&str> = full.discovered().map(|c| c.id.as_str()).collect();
    assert_eq!(added, discovered);
    assert_eq!(discovered.len(), 125);
}

#[tokio::test]
async fn a_failed_rule_listing_has_its_explicit_ids_read_by_id() {
    let explicit = "[[connections]]\nid = \"e\"\nsandbox = \"prod\"\n";
    let config = config(TAG_RULE, explicit);
    let lister = Arc::new(FakeLister::default());
    lister.put("prod", vec![item("e", "explicit", "")]);
    lister.fail("prod", true);
    let (tx, _rx) = mpsc::unbounded_channel();
    let streamed = resolve_streaming(&config, &lister, &tx).await;
    assert_eq!(streamed.membership.failures.len(), 1);
    // The rule listing, then e by id (which fails too here).
    let calls = lister.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].1[0].path, "id");
    assert!(streamed.exact(), "nothing was added, nothing to correct");
}

#[tokio::test]
async fn a_rule_listing_failing_after_some_pages_keeps_what_they_brought() {
    let config = config(TAG_RULE, "");
    let lister = Arc::new(FakeLister::default());
    let prod: Vec<ListedConnection> = (0..(2 * PAGE_LIMIT + 7))
        .map(|n| item(&format!("p{n:03}"), "n", "rotate:aep-s3"))
        .collect();
    lister.put("prod", prod);
    lister
        .fail_after_pages
        .lock()
        .unwrap()
        .insert("prod".to_owned(), 2);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let streamed = resolve_streaming(&config, &lister, &tx).await;
    let mut added = 0;
    while let Ok(Intake::Found { added: a, .. }) = rx.try_recv() {
        added += a.len();
    }
    assert_eq!(added, 2 * PAGE_LIMIT as usize, "two pages were shown");
    assert_eq!(streamed.membership.failures.len(), 1);
    // What the daemon was given stays: no correcting config drops it.
    assert!(streamed.exact());
    assert_eq!(
        streamed.membership.discovered().count(),
        2 * PAGE_LIMIT as usize
    );
    // ...and it is the sandbox's last known listing for the re-lists.
    let kept = &streamed.membership.listings["prod"].items;
    assert_eq!(kept.len(), 2 * PAGE_LIMIT as usize);
}

#[tokio::test]
async fn an_id_listed_in_two_sandboxes_is_corrected_by_the_final_membership() {
    let rule = r#"
[[discover]]
sandboxes = ["a", "b"]
description_tag = "rotate:aep-s3"
"#;
    let config = config(rule, "");
    let lister = Arc::new(FakeLister::default());
    lister.put("a", vec![item("dup", "n", "rotate:aep-s3")]);
    lister.put("b", vec![item("dup", "n", "rotate:aep-s3")]);
    // b answers first, so the page the daemon is given says "b"...
    lister.slow.lock().unwrap().insert("a".to_owned(), 10);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let streamed = resolve_streaming(&config, &lister, &tx).await;
    let Ok(Intake::Found { added, .. }) = rx.try_recv() else {
        panic!("no page sent");
    };
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].sandbox, "b");
    let Ok(Intake::Found { added, .. }) = rx.try_recv() else {
        panic!("a's page not sent");
    };
    assert!(added.is_empty(), "dup is added once: {added:?}");
    // ...but the membership keeps the first sandbox, as `resolve` does,
    // and says the daemon must be corrected.
    let full = resolve(&config, &lister, None, None).await;
    assert_eq!(streamed.membership.connections, full.connections);
    assert_eq!(streamed.membership.connections[0].sandbox, "a");
    assert!(!streamed.exact());
    // It was announced in "b"; the final log must say it changed.
    assert_eq!(streamed.announced.connections.len(), 1);
    assert_eq!(streamed.announced.connections[0].sandbox, "b");
    assert!(log_changes(&streamed.announced, &streamed.membership));
}

#[tokio::test(start_paused = true)]
async fn a_standby_lists_nothing_and_lists_at_once_when_it_takes_over() {
    // Issue 31: with [coordination] every replica re-listed every period,
    // so Flow Service's listing load grew with the replicas.
    let config = config(TAG_RULE, "");
    let lister = Arc::new(FakeLister::default());
    lister.put("prod", vec![item("p1", "a", "rotate:aep-s3")]);
    let initial = resolve(&config, &lister, None, None).await;
    let (tx, mut rx) = mpsc::channel(4);
    let (leads, leading) = watch::channel(false);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_discovery(
        Arc::new(config),
        Arc::clone(&lister),
        Arc::new(initial),
        tx,
        Some(leading),
        cancel.clone(),
    ));
    // Three periods as a standby: no listing (the start's one only).
    lister.put(
        "prod",
        vec![
            item("p1", "a", "rotate:aep-s3"),
            item("p2", "b", "rotate:aep-s3"),
        ],
    );
    tokio::time::sleep(Duration::from_secs(185)).await;
    assert_eq!(lister.calls().len(), 1, "a standby listed");
    assert!(rx.try_recv().is_err());
    // Takes the lease: lists at once, not a period later.
    leads.send_replace(true);
    let m = rx.recv().await.unwrap();
    assert_eq!(ids(&m), ["p1", "p2"]);
    assert_eq!(lister.calls().len(), 2);
    // Then every period, as a single replica does.
    tokio::time::sleep(Duration::from_secs(125)).await;
    assert_eq!(lister.calls().len(), 4);
    // Stands down: no more listings.
    leads.send_replace(false);
    tokio::time::sleep(Duration::from_secs(185)).await;
    assert_eq!(lister.calls().len(), 4);
    cancel.cancel();
    task.await.unwrap();
}
