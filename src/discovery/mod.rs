//! `[[discover]]` rules → the set of connections to rotate, re-listed.
//!
//! Three parts, from pure to wired:
//!
//! - [`matches`] / [`resolve_listings`]: pure. A listed connection is
//!   rotated by a rule when it is an S3 connection with the `Access Key` auth
//!   spec, `enabled`, in one of the rule's sandboxes, and meets every
//!   condition of the rule. An explicit `[[connections]]` entry wins over any
//!   rule; a connection that two rules would rotate with different STS
//!   identities is a [`Conflict`] and is not rotated.
//! - [`resolve`]: lists every sandbox a rule names (`property=connectionSpec.id==<S3>`,
//!   paged) and the explicit connections by id (`property=id==a,b,c`, in
//!   chunks), through a [`Lister`], and answers a [`Membership`] with the
//!   etags it saw, so the first pass needs no `GET` per connection. A sandbox
//!   whose listing fails keeps its previous listing: a failed list call
//!   never drops a connection.
//! - [`run_discovery`]: re-lists each sandbox every `every` (the shortest of
//!   the rules naming it) and sends each changed [`Membership`] on a channel,
//!   logging `connection discovered` / `connection no longer matches`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConnectionConfig, DiscoverRule, Origin};
use crate::remote::flow::{FlowError, ListedConnection, PropertyFilter};
use crate::remote::ims::ImsError;
use crate::remote::s3probe::S3Target;
use crate::remote::sts::StsRequest;
use crate::rotation::Rotator;
use crate::scheduler::Intake;

/// Items per list page. Adobe documents `limit` but no maximum; 100 keeps a
/// page small (~100 KB) while 10,000 connections cost 100 pages (1 %).
pub const PAGE_LIMIT: u32 = 100;

/// Explicit ids per `property=id==a,b,c` request: 80 UUIDs make a ~3 KB
/// query, well under the 8 KB URL limit common to gateways.
pub const ID_CHUNK: usize = 80;

/// Why a listing failed. The sandbox keeps its last known listing either way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ListError {
    /// No IMS token: nothing can be listed until IMS answers again.
    #[error(transparent)]
    Ims(#[from] ImsError),
    /// Flow Service refused or failed the list call (or a page was unusable).
    #[error(transparent)]
    Flow(#[from] FlowError),
}

impl ListError {
    /// True when no list request was made: the IMS failure of another
    /// request was the answer (logged once, `ims token request failed`).
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Ims(e) if e.is_shared())
    }
}

/// A failed id chunk: its connections read their own etag. At `debug` when
/// the failure was IMS's shared answer (one line for the outage, not one
/// per chunk).
fn log_bulk_failure(sandbox: &str, error: &ListError) {
    if error.is_shared() {
        tracing::debug!(sandbox = %sandbox, error = %error, "bulk etag read failed; those connections are read one by one");
    } else {
        tracing::warn!(sandbox = %sandbox, error = %error, "bulk etag read failed; those connections are read one by one");
    }
}

/// The list call, behind a trait so matching and resolving are testable
/// without HTTP. [`FlowLister`] is the real one.
pub trait Lister: Send + Sync {
    /// Every item of `GET /connections` in `sandbox` that passes `filters`,
    /// all pages followed.
    fn list(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ListedConnection>, ListError>> + Send;

    /// [`Self::list`], showing each page's items to `on_page` as it arrives
    /// (the start rotates them while the next page is on its way). The
    /// default shows the whole listing as one page.
    fn list_pages(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
        on_page: &mut (dyn FnMut(&[ListedConnection]) + Send),
    ) -> impl Future<Output = Result<Vec<ListedConnection>, ListError>> + Send {
        async move {
            let items = self.list(sandbox, filters, limit).await?;
            on_page(&items);
            Ok(items)
        }
    }
}

/// Lists through the daemon's own Flow Service client (same request gate and
/// rate limit as the rotations) with its IMS token cache; a 401 drops the
/// token and retries once, as a rotation does.
#[derive(Debug, Clone)]
pub struct FlowLister {
    rotator: Arc<Rotator>,
}

impl FlowLister {
    /// A lister over `rotator`'s Flow and IMS clients.
    pub fn new(rotator: Arc<Rotator>) -> Self {
        Self { rotator }
    }
}

impl Lister for FlowLister {
    async fn list(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
    ) -> Result<Vec<ListedConnection>, ListError> {
        self.list_pages(sandbox, filters, limit, &mut |_| {}).await
    }

    async fn list_pages(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
        on_page: &mut (dyn FnMut(&[ListedConnection]) + Send),
    ) -> Result<Vec<ListedConnection>, ListError> {
        let answer = self.list_once(sandbox, filters, limit, on_page).await;
        // One count per listing (all its pages), whatever it was for.
        self.rotator
            .telemetry
            .discovery_listing(sandbox, answer.is_ok());
        answer
    }
}

impl FlowLister {
    async fn list_once(
        &self,
        sandbox: &str,
        filters: &[PropertyFilter],
        limit: u32,
        on_page: &mut (dyn FnMut(&[ListedConnection]) + Send),
    ) -> Result<Vec<ListedConnection>, ListError> {
        let mut retried = false;
        loop {
            let token = self.rotator.ims.token().await?;
            // A retry after a 401 shows its pages again: the callers
            // tolerate an item seen twice.
            match self
                .rotator
                .flow
                .list_connections_paged(sandbox, filters, limit, &token, on_page)
                .await
            {
                Err(FlowError::Unauthorized(_)) if !retried => {
                    retried = true;
                    self.rotator.ims.invalidate(&token).await;
                }
                other => return Ok(other?),
            }
        }
    }
}

/// A connection that two or more rules would rotate with different STS
/// identities: an operator must decide, so it is not rotated at all.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// Connection id.
    pub id: String,
    /// Its sandbox.
    pub sandbox: String,
    /// Its name in AEP, if any.
    pub name: Option<String>,
    /// Indexes of the rules (`discover[N]`) that matched it.
    pub rules: Vec<usize>,
}

/// The last good listing of one sandbox (all S3 connections in it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxListing {
    /// The items, as listed.
    pub items: Vec<ListedConnection>,
}

/// The set of connections to rotate now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    /// Explicit `[[connections]]` first (config order), then discovered ones
    /// by (sandbox, id). Ids are unique.
    pub connections: Vec<ConnectionConfig>,
    /// Etags seen in list pages, by connection id, for connections in
    /// `connections` that are S3 `Access Key` connections: the first job of
    /// such a connection can PATCH without a `GET`.
    pub etags: HashMap<String, String>,
    /// S3 targets (bucket, folder, endpoint) seen in the same list items as
    /// `etags`, by connection id: the pre-push check of the first job then
    /// needs no `GET` either.
    pub targets: HashMap<String, S3Target>,
    /// Connections matched by rules with different STS identities (not in
    /// `connections`).
    pub conflicts: Vec<Conflict>,
    /// Sandboxes whose listing failed this time (sandbox, error); their
    /// previous listing was used.
    pub failures: Vec<(String, String)>,
    /// The last good listing of each sandbox a rule names.
    pub listings: BTreeMap<String, SandboxListing>,
}

impl Membership {
    /// Connections found by rules (not explicit ones).
    pub fn discovered(&self) -> impl Iterator<Item = &ConnectionConfig> {
        self.connections
            .iter()
            .filter(|c| c.origin != Origin::Explicit)
    }

    /// Whether the rotated set (or the conflicts) differ from `other`:
    /// what the scheduler must be told about. Etags and listings do not count.
    pub fn differs_from(&self, other: &Membership) -> bool {
        self.connections != other.connections || self.conflicts != other.conflicts
    }

    /// `config` with its connections replaced by this membership's.
    pub fn apply_to(&self, config: &Config) -> Config {
        let mut config = config.clone();
        config.connections = self.connections.clone();
        config
    }
}

/// Whether `rule` rotates connection `c`, listed in `sandbox`.
pub fn matches(rule: &DiscoverRule, sandbox: &str, c: &ListedConnection) -> bool {
    c.is_rotatable_s3()
        && rule.sandboxes.iter().any(|s| s == sandbox)
        && rule
            .name
            .as_ref()
            .is_none_or(|glob| c.name.as_deref().is_some_and(|n| glob.is_match(n)))
        && rule.description_tag.as_ref().is_none_or(|tag| {
            c.description
                .as_deref()
                .is_some_and(|d| has_tag(d, tag))
        })
        // A rule without conditions never validates; this keeps the promise
        // even for a rule built by hand.
        && (rule.name.is_some() || rule.description_tag.is_some())
}

/// Whether `description` carries `tag` as a whole word: an occurrence
/// bounded on both sides by the text's ends, whitespace or punctuation that
/// separates words (`, ; ( ) [ ] { } < > " ' |`, or a sentence's final `.`).
/// A substring test let `do-not-rotate:aep-s3` match `rotate:aep-s3` (issue 26).
pub fn has_tag(description: &str, tag: &str) -> bool {
    fn separates(c: char) -> bool {
        c.is_whitespace() || ",;()[]{}<>\"'|".contains(c)
    }
    if tag.is_empty() {
        return false;
    }
    description.match_indices(tag).any(|(at, _)| {
        let before = description[..at].chars().next_back();
        let after = &description[at + tag.len()..];
        let after_ok = match after.chars().next() {
            None => true,
            Some('.') => after[1..].chars().next().is_none_or(separates),
            Some(c) => separates(c),
        };
        before.is_none_or(separates) && after_ok
    })
}

/// Every sandbox a rule names, with the shortest `every` among those rules.
pub fn sandbox_periods(rules: &[DiscoverRule]) -> BTreeMap<String, Duration> {
    let mut periods: BTreeMap<String, Duration> = BTreeMap::new();
    for rule in rules {
        for sandbox in &rule.sandboxes {
            periods
                .entry(sandbox.clone())
                .and_modify(|p| *p = (*p).min(rule.every))
                .or_insert(rule.every);
        }
    }
    periods
}

/// Pure: the membership that `listings` (sandbox → items) give under
/// `config`'s rules and explicit connections. `failures` and `etags` of
/// explicit connections are filled in by [`resolve`].
pub fn resolve_listings(config: &Config, listings: BTreeMap<String, SandboxListing>) -> Membership {
    let explicit: HashSet<&str> = config.connections.iter().map(|c| c.id.as_str()).collect();
    let found = discovered_in(
        config,
        &explicit,
        listings
            .iter()
            .map(|(sandbox, listing)| (sandbox.as_str(), listing.items.as_slice())),
    );
    let mut connections = config.connections.clone();
    connections.extend(found.connections);
    Membership {
        connections,
        listings,
        ..found
    }
}

/// What the rules find in `listings` (sandbox, items), `explicit` ids
/// excluded: the membership without the explicit connections and without
/// the listings. The streaming start calls it once per page and the final
/// membership once over 10,000 items, so it borrows what it can and builds
/// an identity only where two rules must be compared.
fn discovered_in<'a>(
    config: &Config,
    explicit: &HashSet<&str>,
    listings: impl IntoIterator<Item = (&'a str, &'a [ListedConnection])>,
) -> Membership {
    // (sandbox, id) → the listed item and each matching rule's entry.
    let mut found: BTreeMap<(&str, &str), (&ListedConnection, Vec<ConnectionConfig>)> =
        BTreeMap::new();
    for (sandbox, items) in listings {
        for item in items {
            if explicit.contains(item.id.as_str()) {
                continue;
            }
            for rule in &config.discover {
                if matches(rule, sandbox, item) {
                    found
                        .entry((sandbox, item.id.as_str()))
                        .or_insert_with(|| (item, Vec::new()))
                        .1
                        .push(rule.connection(&item.id, sandbox, item.name.as_deref()));
                }
            }
        }
    }
    let mut membership = Membership {
        connections: Vec::with_capacity(found.len()),
        etags: HashMap::with_capacity(found.len()),
        targets: HashMap::with_capacity(found.len()),
        ..Membership::default()
    };
    // The same id listed in two sandboxes cannot be: ids are global. Keep the
    // first (sandbox order) and skip the other rather than guess. (Explicit
    // ids never get here: they were skipped above.)
    let mut taken: HashSet<&str> = HashSet::with_capacity(found.len());
    for ((sandbox, id), (item, candidates)) in found {
        if !taken.insert(id) {
            continue;
        }
        // One rule is one identity; several must agree on theirs.
        let agree = candidates.len() == 1
            || candidates
                .iter()
                .map(|c| StsRequest::for_connection(config, c))
                .collect::<HashSet<_>>()
                .len()
                == 1;
        if !agree {
            let rules = candidates
                .iter()
                .filter_map(|c| match c.origin {
                    Origin::Rule(i) => Some(i),
                    Origin::Explicit => None,
                })
                .collect();
            membership.conflicts.push(Conflict {
                id: id.to_owned(),
                sandbox: sandbox.to_owned(),
                name: item.name.clone(),
                rules,
            });
            continue;
        }
        // Same identity from several rules: the first rule names it.
        if let Some(first) = candidates.into_iter().next() {
            if let Some(target) = &item.s3 {
                membership.targets.insert(id.to_owned(), target.clone());
            }
            membership.etags.insert(id.to_owned(), item.etag.clone());
            membership.connections.push(first);
        }
    }
    membership
}

/// Lists what `config` needs and answers the membership.
///
/// - Each sandbox in `due` (every sandbox a rule names when `due` is `None`)
///   is listed with `property=connectionSpec.id==<S3>`; a sandbox not due, or
///   whose listing fails, keeps its listing from `previous`.
/// - On a full resolve (`due` is `None`: start, reload), explicit connections
///   whose etag was not in those listings are listed by id
///   (`property=id==a,b,c`, [`ID_CHUNK`] at a time, per sandbox) for their
///   etag only; a failure there just means one `GET` later.
pub async fn resolve<L: Lister>(
    config: &Config,
    lister: &L,
    previous: Option<&Membership>,
    due: Option<&BTreeSet<String>>,
) -> Membership {
    let mut listings = BTreeMap::new();
    let mut failures = Vec::new();
    let mut to_list = Vec::new();
    for sandbox in sandbox_periods(&config.discover).into_keys() {
        let last = previous.and_then(|p| p.listings.get(&sandbox));
        match (due, last) {
            (Some(due), Some(last)) if !due.contains(&sandbox) => {
                listings.insert(sandbox, last.clone());
            }
            _ => to_list.push(sandbox),
        }
    }
    // Sandboxes are listed side by side (pages within one are sequential by
    // nature); the request gate still bounds what is in flight.
    let filters = [PropertyFilter::s3()];
    // A full resolve (start, reload) is waited for: bounded in time as the
    // streaming start is. A periodic re-list is not (nobody waits for it).
    let budget = due.is_none().then(|| start_listing_budget(config));
    let answers = futures::future::join_all(
        to_list
            .iter()
            .map(|sandbox| within(budget, lister.list(sandbox, &filters, PAGE_LIMIT))),
    )
    .await;
    for (sandbox, answer) in to_list.into_iter().zip(answers) {
        match answer {
            Ok(items) => {
                listings.insert(sandbox, SandboxListing { items });
            }
            Err(error) => {
                failures.push((sandbox.clone(), error.to_string()));
                if let Some(last) = previous.and_then(|p| p.listings.get(&sandbox)) {
                    listings.insert(sandbox, last.clone());
                }
            }
        }
    }
    let mut membership = resolve_listings(config, listings);
    membership.failures = failures;
    // Only a full resolve (start, reload) needs them: the periodic re-list
    // only decides membership, and explicit connections never change it.
    if due.is_none() {
        explicit_etags(config, lister, &mut membership).await;
    }
    membership
}

/// Fills in the etags of explicit connections: from the rule listings when
/// they hold them, else by id in chunks.
async fn explicit_etags<L: Lister>(config: &Config, lister: &L, membership: &mut Membership) {
    let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for connection in &config.connections {
        let listed = membership
            .listings
            .get(&connection.sandbox)
            .and_then(|l| l.items.iter().find(|i| i.id == connection.id));
        match listed {
            Some(item) if item.is_s3_access_key() => {
                membership
                    .etags
                    .insert(connection.id.clone(), item.etag.clone());
                if let Some(target) = &item.s3 {
                    membership
                        .targets
                        .insert(connection.id.clone(), target.clone());
                }
            }
            _ => wanted
                .entry(connection.sandbox.as_str())
                .or_default()
                .push(connection.id.as_str()),
        }
    }
    // Chunks are listed side by side, as sandboxes are: one after another
    // they cost a round trip each before the first PATCH (16 at 1,000
    // connections); the request gate still bounds what is in flight.
    let chunks: Vec<(&str, &[&str])> = wanted
        .iter()
        .flat_map(|(sandbox, ids)| ids.chunks(ID_CHUNK).map(move |chunk| (*sandbox, chunk)))
        .collect();
    let answers = futures::future::join_all(chunks.iter().map(|(sandbox, chunk)| {
        let filter = PropertyFilter::ids(chunk.iter().copied());
        let limit = u32::try_from(chunk.len()).unwrap_or(PAGE_LIMIT);
        // Only a full resolve reads them, and it is waited for: bounded.
        let budget = Some(start_listing_budget(config));
        async move { within(budget, lister.list(sandbox, &[filter], limit)).await }
    }))
    .await;
    for ((sandbox, chunk), answer) in chunks.into_iter().zip(answers) {
        match answer {
            Ok(items) => {
                for item in items.iter().filter(|i| i.is_s3_access_key()) {
                    if chunk.contains(&item.id.as_str()) {
                        membership.etags.insert(item.id.clone(), item.etag.clone());
                        if let Some(target) = &item.s3 {
                            membership.targets.insert(item.id.clone(), target.clone());
                        }
                    }
                }
            }
            Err(error) => log_bulk_failure(sandbox, &error),
        }
    }
}

/// Id chunks of the streaming start in flight at once. The request gate
/// is first come, first served: 128 chunks (10,000 explicit connections)
/// sent at once sat ahead of every PATCH, so the first PATCH waited for
/// the last chunk (0.46 s measured) as before streaming. Four keep PATCHes
/// flowing between them and still seed connections faster than the
/// rotations use them (a chunk seeds 80 in about one round trip plus the
/// queue ahead of it; 32 slots rotate about 32 per round trip).
const STREAM_CHUNKS_IN_FLIGHT: usize = 4;

/// How many request timeouts the start's listing of one sandbox may take
/// (its pages and id chunks together) before it counts as failed: `READY=1`
/// waits for it, and an endless but progressing listing delayed it by up to
/// 1,000 request timeouts (issue 26). Four let a real listing of 10,000
/// connections (100 pages of ~0.1 s) finish many times over.
pub const START_LISTING_TIMEOUTS: u32 = 4;

/// The least the start's listing of one sandbox is given, whatever the
/// request timeout: a listing of a large sandbox under a short timeout
/// still finishes.
pub const MIN_START_LISTING: Duration = Duration::from_secs(30);

/// How long the start's listing of one sandbox may take: see
/// [`START_LISTING_TIMEOUTS`]. Past it the sandbox's listing failed (the
/// pages that arrived are kept) and the periodic re-list takes over.
pub fn start_listing_budget(config: &Config) -> Duration {
    config
        .rotation
        .request_timeout
        .saturating_mul(START_LISTING_TIMEOUTS)
        .max(MIN_START_LISTING)
}

/// `listing`, failed when it takes longer than `budget` (if any).
async fn within<T>(
    budget: Option<Duration>,
    listing: impl Future<Output = Result<T, ListError>>,
) -> Result<T, ListError> {
    let Some(budget) = budget else {
        return listing.await;
    };
    tokio::time::timeout(budget, listing)
        .await
        .unwrap_or_else(|_| {
            Err(ListError::Flow(FlowError::Unavailable(format!(
                "the listing took longer than {}; the periodic re-list continues it",
                humantime::format_duration(budget)
            ))))
        })
}

/// What [`resolve_streaming`] answers.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// The membership [`resolve`] would answer for the same listings: the
    /// authority.
    pub membership: Membership,
    /// The discovered connections sent as `added` (by sandbox, then id),
    /// each already logged as `connection discovered` when its page came:
    /// the membership before the final one, for [`log_changes`].
    pub announced: Membership,
}

impl Streamed {
    /// Whether the explicit connections plus those sent as `added` are
    /// exactly `membership.connections` (the usual case): otherwise the
    /// daemon must be sent the membership as a config, to drop what a
    /// failed listing or an id listed twice made it add. Both lists of
    /// discovered connections are in (sandbox, id) order.
    pub fn exact(&self) -> bool {
        self.membership
            .discovered()
            .eq(self.announced.connections.iter())
    }
}

/// What the streaming start has sent so far.
#[derive(Debug, Default)]
struct StreamState {
    /// Discovered connections sent as `added`, by id.
    sent: HashMap<String, ConnectionConfig>,
    /// Etags and S3 targets of explicit connections seen.
    etags: HashMap<String, String>,
    targets: HashMap<String, S3Target>,
    /// The listed items of the connections sent as `added`, by sandbox,
    /// until that sandbox's listing completes: if it fails on a later page,
    /// they are its (partial) last known listing, so what the daemon was
    /// given is kept, not dropped because a list call failed.
    partial: HashMap<String, Vec<ListedConnection>>,
}

impl StreamState {
    /// An explicit connection's etag and S3 target from its list item: into
    /// the message for the daemon, and kept for the final membership.
    fn seed(
        &mut self,
        item: &ListedConnection,
        etags: &mut HashMap<String, String>,
        targets: &mut HashMap<String, S3Target>,
    ) {
        etags.insert(item.id.clone(), item.etag.clone());
        self.etags.insert(item.id.clone(), item.etag.clone());
        if let Some(target) = &item.s3 {
            targets.insert(item.id.clone(), target.clone());
            self.targets.insert(item.id.clone(), target.clone());
        }
    }
}

fn lock(state: &std::sync::Mutex<StreamState>) -> std::sync::MutexGuard<'_, StreamState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The start's full resolve, streamed: it lists what [`resolve`] lists
/// (every sandbox a rule names, then by id the explicit connections whose
/// etag those listings did not carry; sandboxes without a rule by id at
/// once) and sends an [`Intake::Found`] to `intake` for every rule-list
/// page and every id chunk as it arrives, so the daemon rotates the first
/// connections while the later pages are still on their way.
///
/// A page's matches are decided by the same rules as [`resolve_listings`]
/// on that page alone (explicit ids excluded, conflicting rules not
/// rotated); an id already sent is not sent again. The membership it
/// answers is built as [`resolve`] builds it and is the authority (see
/// [`Streamed::exact`]). Sends no `Done`: the caller does, once it has the
/// membership.
pub async fn resolve_streaming<L: Lister>(
    config: &Config,
    lister: &L,
    intake: &mpsc::UnboundedSender<Intake>,
) -> Streamed {
    let explicit: HashMap<&str, &str> = config
        .connections
        .iter()
        .map(|c| (c.id.as_str(), c.sandbox.as_str()))
        .collect();
    let explicit_ids: HashSet<&str> = explicit.keys().copied().collect();
    let rule_sandboxes: BTreeSet<String> = sandbox_periods(&config.discover).into_keys().collect();
    // Explicit ids by sandbox in config order (the chunks `resolve` makes),
    // and every rule sandbox, with or without explicit ids.
    let mut by_sandbox: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in &config.connections {
        by_sandbox.entry(&c.sandbox).or_default().push(&c.id);
    }
    for sandbox in &rule_sandboxes {
        by_sandbox.entry(sandbox.as_str()).or_default();
    }
    let state = std::sync::Mutex::new(StreamState::default());
    let filters = [PropertyFilter::s3()];
    let chunk_slots = tokio::sync::Semaphore::new(STREAM_CHUNKS_IN_FLIGHT);
    let (state_ref, explicit_ref, explicit_ids_ref, filters_ref, slots) =
        (&state, &explicit, &explicit_ids, &filters, &chunk_slots);
    // Sandboxes side by side, as `resolve` lists them; within one sandbox
    // its id chunks wait for its rule listing (they are only for the ids
    // that listing did not carry). The request gate bounds what is in flight.
    let budget = start_listing_budget(config);
    let answers = futures::future::join_all(by_sandbox.iter().map(|(sandbox, ids)| {
        let with_rules = rule_sandboxes.contains(*sandbox);
        let work = async move {
            let mut missing: Vec<&str> = ids.clone();
            let listing = if with_rules {
                let mut on_page = |items: &[ListedConnection]| {
                    let found = page_found(
                        config,
                        sandbox,
                        explicit_ref,
                        explicit_ids_ref,
                        items,
                        state_ref,
                    );
                    // The daemon gone means shutdown: nothing left to feed.
                    let _ = intake.send(found);
                };
                let answer = lister
                    .list_pages(sandbox, filters_ref, PAGE_LIMIT, &mut on_page)
                    .await;
                if let Ok(items) = &answer {
                    // Complete: the full listing is the authority now.
                    lock(state_ref).partial.remove(*sandbox);
                    let carried: HashSet<&str> = items
                        .iter()
                        .filter(|i| i.is_s3_access_key())
                        .map(|i| i.id.as_str())
                        .collect();
                    missing.retain(|id| !carried.contains(id));
                }
                Some(answer)
            } else {
                None
            };
            futures::future::join_all(missing.chunks(ID_CHUNK).map(|chunk| async move {
                // Never closed: an error would only mean "no bound".
                let _slot = slots.acquire().await.ok();
                let filter = PropertyFilter::ids(chunk.iter().copied());
                let limit = u32::try_from(chunk.len()).unwrap_or(PAGE_LIMIT);
                let mut on_page = |items: &[ListedConnection]| {
                    let _ = intake.send(chunk_found(chunk, items, state_ref));
                };
                if let Err(error) = lister
                    .list_pages(sandbox, &[filter], limit, &mut on_page)
                    .await
                {
                    log_bulk_failure(sandbox, &error);
                }
            }))
            .await;
            listing
        };
        async move {
            match tokio::time::timeout(budget, work).await {
                Ok(listing) => listing,
                Err(_) => {
                    let error = FlowError::Unavailable(format!(
                        "the start's listing took longer than {}; the periodic re-list continues it",
                        humantime::format_duration(budget)
                    ));
                    tracing::warn!(sandbox = %sandbox, error = %error, "listing cut short");
                    with_rules.then_some(Err(ListError::Flow(error)))
                }
            }
        }
    }))
    .await;
    let mut state = state
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut listings = BTreeMap::new();
    let mut failures = Vec::new();
    for (sandbox, answer) in by_sandbox.keys().zip(answers) {
        match answer {
            Some(Ok(items)) => {
                listings.insert((*sandbox).to_owned(), SandboxListing { items });
            }
            Some(Err(error)) => {
                failures.push(((*sandbox).to_owned(), error.to_string()));
                // The pages that did arrive are this sandbox's last known
                // listing: their connections stay (the daemon has them).
                if let Some(items) = state.partial.remove(*sandbox) {
                    listings.insert((*sandbox).to_owned(), SandboxListing { items });
                }
            }
            None => {}
        }
    }
    // The last page's `Found` woke the daemon into this worker's LIFO slot,
    // which the other worker cannot take: let it run before the final
    // membership (tens of milliseconds at 10,000 connections) holds this one.
    tokio::task::yield_now().await;
    let mut membership = resolve_listings(config, listings);
    membership.failures = failures;
    membership.etags.extend(state.etags);
    membership.targets.extend(state.targets);
    let mut announced: Vec<ConnectionConfig> = state.sent.into_values().collect();
    announced.sort_by(|a, b| (&a.sandbox, &a.id).cmp(&(&b.sandbox, &b.id)));
    Streamed {
        membership,
        announced: Membership {
            connections: announced,
            ..Membership::default()
        },
    }
}

/// One rule-list page of `sandbox`: the connections the rules find on it
/// (not sent before) with their etags and targets, and the etags of the
/// explicit connections of that sandbox it carries.
fn page_found(
    config: &Config,
    sandbox: &str,
    explicit: &HashMap<&str, &str>,
    explicit_ids: &HashSet<&str>,
    items: &[ListedConnection],
    state: &std::sync::Mutex<StreamState>,
) -> Intake {
    let Membership {
        connections,
        mut etags,
        mut targets,
        ..
    } = discovered_in(config, explicit_ids, [(sandbox, items)]);
    let by_id: HashMap<&str, &ListedConnection> =
        items.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut added = Vec::with_capacity(connections.len());
    {
        let mut state = lock(state);
        for connection in connections {
            if state.sent.contains_key(&connection.id) {
                // Listed again (a retried listing, or a second sandbox): the
                // first word stands, the final membership settles the rest.
                etags.remove(&connection.id);
                targets.remove(&connection.id);
                continue;
            }
            state.sent.insert(connection.id.clone(), connection.clone());
            if let Some(item) = by_id.get(connection.id.as_str()) {
                state
                    .partial
                    .entry(sandbox.to_owned())
                    .or_default()
                    .push((*item).clone());
            }
            added.push(connection);
        }
        for item in items {
            if item.is_s3_access_key() && explicit.get(item.id.as_str()) == Some(&sandbox) {
                state.seed(item, &mut etags, &mut targets);
            }
        }
    }
    // Announced as the daemon gets them, page by page (the final
    // membership's log then names only what differs from these): 10,000
    // lines written at the end of the listing held a runtime worker for
    // 60 ms while the first pass was running.
    for connection in &added {
        log_discovered(connection);
    }
    Intake::Found {
        added,
        etags,
        targets,
    }
}

/// One id chunk's answer: the etags and targets of the explicit
/// connections it asked for.
fn chunk_found(
    chunk: &[&str],
    items: &[ListedConnection],
    state: &std::sync::Mutex<StreamState>,
) -> Intake {
    let mut etags = HashMap::new();
    let mut targets = HashMap::new();
    let mut state = lock(state);
    for item in items {
        if item.is_s3_access_key() && chunk.contains(&item.id.as_str()) {
            state.seed(item, &mut etags, &mut targets);
        }
    }
    Intake::Found {
        added: Vec::new(),
        etags,
        targets,
    }
}

fn log_discovered(c: &ConnectionConfig) {
    tracing::info!(connection = %c.id, sandbox = %c.sandbox, name = %c.name, origin = %c.origin, "connection discovered");
}

/// Logs what changed from `previous` to `next`: `connection discovered`,
/// `connection no longer matches`, new conflicts and listing failures.
/// Answers whether the rotated set changed.
pub fn log_changes(previous: &Membership, next: &Membership) -> bool {
    let before: HashMap<&str, &ConnectionConfig> =
        previous.discovered().map(|c| (c.id.as_str(), c)).collect();
    let after: HashMap<&str, &ConnectionConfig> =
        next.discovered().map(|c| (c.id.as_str(), c)).collect();
    for c in next.discovered() {
        if !before.contains_key(c.id.as_str()) {
            log_discovered(c);
        }
    }
    for c in previous.discovered() {
        if !after.contains_key(c.id.as_str()) {
            tracing::info!(connection = %c.id, sandbox = %c.sandbox, name = %c.name, origin = %c.origin, "connection no longer matches");
        }
    }
    for conflict in &next.conflicts {
        if !previous.conflicts.contains(conflict) {
            let rules: Vec<String> = conflict
                .rules
                .iter()
                .map(|i| format!("discover[{i}]"))
                .collect();
            tracing::error!(
                connection = %conflict.id,
                sandbox = %conflict.sandbox,
                name = conflict.name.as_deref().unwrap_or(""),
                rules = %rules.join(", "),
                "connection matched by rules with different identities, not rotated; make the rules agree or list it under [[connections]]"
            );
        }
    }
    for (sandbox, error) in &next.failures {
        tracing::warn!(sandbox = %sandbox, error = %error, "listing connections failed, keeping the last known set");
    }
    next.differs_from(previous)
}

/// Re-lists every sandbox a rule names every `every` (the shortest of the
/// rules naming it) and sends each membership that differs from the last one
/// sent on `tx`. `current` is the membership the caller already applied.
/// Returns when `cancel` fires or the receiver is gone; does nothing (but
/// wait for `cancel`) when `config` has no rules.
pub async fn run_discovery<L: Lister>(
    config: Config,
    lister: L,
    mut current: Arc<Membership>,
    tx: mpsc::Sender<Arc<Membership>>,
    cancel: CancellationToken,
) {
    let periods = sandbox_periods(&config.discover);
    if periods.is_empty() {
        cancel.cancelled().await;
        return;
    }
    let start = crate::clock::mono_now();
    let mut next_due: BTreeMap<String, tokio::time::Instant> = periods
        .iter()
        .map(|(sandbox, every)| (sandbox.clone(), start + *every))
        .collect();
    loop {
        let Some(wake) = next_due.values().min().copied() else {
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = crate::clock::mono_now();
        let due: BTreeSet<String> = next_due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(sandbox, _)| sandbox.clone())
            .collect();
        for sandbox in &due {
            if let (Some(at), Some(every)) = (next_due.get_mut(sandbox), periods.get(sandbox)) {
                // From now, not from the missed deadline: a slow listing
                // never turns into a burst of catch-up listings.
                *at = now + *every;
            }
        }
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = resolve(&config, &lister, Some(&current), Some(&due)) => next,
        };
        let changed = log_changes(&current, &next);
        // Shared, not copied: a membership of 10,000 connections takes
        // tens of milliseconds to clone.
        current = Arc::new(next);
        if changed && tx.send(Arc::clone(&current)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
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
            config,
            Arc::clone(&lister),
            Arc::new(initial),
            tx,
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
        assert_eq!(streamed.membership, full);
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
}
