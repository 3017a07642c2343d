//! What a listing means: which listed connections each `[[discover]]` rule
//! matches (pure functions of the listings and the config), and the
//! resulting membership with its conflicts.

use super::*;

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
    pub connections: Vec<Arc<ConnectionConfig>>,
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
    pub fn discovered(&self) -> impl Iterator<Item = &Arc<ConnectionConfig>> {
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
pub(super) fn discovered_in<'a>(
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
            membership.connections.push(Arc::new(first));
        }
    }
    membership
}
