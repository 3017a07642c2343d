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

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConnectionConfig, DiscoverRule, Origin};
use crate::remote::flow::{FlowError, ListedConnection, PropertyFilter};
use crate::remote::ims::ImsError;
use crate::remote::s3probe::S3Target;
use crate::remote::sts::StsRequest;
use crate::rotation::Rotator;
use crate::scheduler::Intake;

mod rules;
pub use rules::*;

#[cfg(test)]
mod tests;

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
    /// How many connections' etags the pages carried (each sent to the
    /// daemon with its page; `membership` keeps no etags or targets).
    pub etags: usize,
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
    sent: HashMap<String, Arc<ConnectionConfig>>,
    /// How many explicit connections' etags were sent (each went to the
    /// daemon with its page and is not kept here: at 10,000 connections a
    /// second copy of every etag and target was megabytes at the start's
    /// peak).
    explicit_etags: usize,
    /// The listed items of the connections sent as `added`, by sandbox,
    /// until that sandbox's listing completes: if it fails on a later page,
    /// they are its (partial) last known listing, so what the daemon was
    /// given is kept, not dropped because a list call failed.
    partial: HashMap<String, Vec<ListedConnection>>,
}

impl StreamState {
    /// An explicit connection's etag and S3 target from its list item: into
    /// the message for the daemon (counted, not kept).
    fn seed(
        &mut self,
        item: &ListedConnection,
        etags: &mut HashMap<String, String>,
        targets: &mut HashMap<String, S3Target>,
    ) {
        etags.insert(item.id.clone(), item.etag.clone());
        self.explicit_etags += 1;
        if let Some(target) = &item.s3 {
            targets.insert(item.id.clone(), target.clone());
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
    // Every etag and target went to the daemon with its page: the
    // membership, which outlives the start, keeps none.
    let etags = membership.etags.len() + state.explicit_etags;
    membership.etags = HashMap::new();
    membership.targets = HashMap::new();
    let mut announced: Vec<Arc<ConnectionConfig>> = state.sent.into_values().collect();
    announced.sort_by(|a, b| (&a.sandbox, &a.id).cmp(&(&b.sandbox, &b.id)));
    Streamed {
        membership,
        announced: Membership {
            connections: announced,
            ..Membership::default()
        },
        etags,
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
    // A set, not `chunk.contains`: a chunk and its page are ~80 ids each,
    // and 10,000 connections make 128 of them.
    let asked: std::collections::HashSet<&str> = chunk.iter().copied().collect();
    let mut state = lock(state);
    for item in items {
        if item.is_s3_access_key() && asked.contains(item.id.as_str()) {
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
    let before: HashMap<&str, &Arc<ConnectionConfig>> =
        previous.discovered().map(|c| (c.id.as_str(), c)).collect();
    let after: HashMap<&str, &Arc<ConnectionConfig>> =
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
///
/// `leading` (`[coordination]`): only while it says `true` does this
/// replica list, so Flow Service sees one replica's listings however many
/// run; a due round of a standby is skipped, and the moment it becomes the
/// leader every sandbox is listed at once (its membership may be old).
pub async fn run_discovery<L: Lister>(
    config: Arc<Config>,
    lister: L,
    mut current: Arc<Membership>,
    tx: mpsc::Sender<Arc<Membership>>,
    mut leading: Option<watch::Receiver<bool>>,
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
        let mut took_over = false;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(wake) => {}
            now_leads = became_leader(&mut leading) => took_over = now_leads,
        }
        let now = crate::clock::mono_now();
        let due: BTreeSet<String> = next_due
            .iter()
            .filter(|(_, at)| took_over || **at <= now)
            .map(|(sandbox, _)| sandbox.clone())
            .collect();
        for sandbox in &due {
            if let (Some(at), Some(every)) = (next_due.get_mut(sandbox), periods.get(sandbox)) {
                // From now, not from the missed deadline: a slow listing
                // never turns into a burst of catch-up listings.
                *at = now + *every;
            }
        }
        if leading.as_ref().is_some_and(|l| !*l.borrow()) {
            // A standby: the leader lists (its rounds are skipped, not owed).
            continue;
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

/// Resolves with `true` when `leading` turns true (this replica took the
/// lease), `false` on other changes; never without coordination, nor once
/// the sender is gone.
async fn became_leader(leading: &mut Option<watch::Receiver<bool>>) -> bool {
    let Some(receiver) = leading.as_mut() else {
        return std::future::pending().await;
    };
    let was = *receiver.borrow_and_update();
    if receiver.changed().await.is_err() {
        *leading = None;
        return false;
    }
    !was && *receiver.borrow_and_update()
}
