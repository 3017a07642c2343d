//! Simulated `GET /connections`: filter, sort and page base connections as
//! Adobe's "Sorting and filtering responses in the Flow Service API" guide
//! documents it, strictly.
//!
//! - `property=PATH OP VALUE`, `PATH` dotted (`auth.specName`), a segment
//!   may end in `[]` to look into every element of an array; `OP` is `==` or
//!   `!=` (any value), or `<`, `>`, `<=`, `>=` (numbers). A comma-separated
//!   value list matches any of the values (`!=`: none of them). Several
//!   `property=` parameters are ANDed.
//! - `orderby=name|-name|createdAt|-createdAt` (default: creation order).
//! - `limit=N` (1..=1000; default 100) caps a page; when more items remain,
//!   `_links.next.href` is `/connections?continuationToken=...`.
//! - `count=true|false`: `count` in the answer.
//! - `continuationToken` continues the query it came from: the same filters
//!   and order must be sent again (whether the token alone keeps them is not
//!   documented, so a client must not rely on it), else 400.
//!
//! Anything else (an unknown parameter, a filter without an operator, a bad
//! path or number) is a 400 and a recorded violation: a correct client
//! never sends it.

use std::cmp::Ordering;

use axum::http::request::Parts;
use axum::response::Response;
use serde_json::{Value, json};

use super::flow::{connection_item, flow_error};
use super::state::{Conn, State as SimState};

/// Adobe documents `limit` without a maximum; 1000 bounds one answer.
const MAX_LIMIT: usize = 1000;
/// What a page holds when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;
/// The documented parameters, and only those.
const PARAMETERS: [&str; 5] = ["property", "limit", "orderby", "continuationToken", "count"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone)]
struct Filter {
    path: Vec<(String, bool)>,
    op: Op,
    values: Vec<String>,
}

/// The query, parsed; `Err` is the 400's detail.
#[derive(Debug)]
struct Query {
    filters: Vec<Filter>,
    /// The filters as sent, sorted: what a continuation token is tied to.
    filter_texts: Vec<String>,
    order: (String, bool),
    limit: usize,
    count: bool,
    token: Option<String>,
}

fn parse_filter(text: &str) -> Result<Filter, String> {
    // Longest operators first, so `<=` is not read as `<`.
    let ops = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let (at, token, op) = ops
        .iter()
        .filter_map(|(token, op)| text.find(token).map(|at| (at, *token, *op)))
        .min_by_key(|(at, token, _)| (*at, std::cmp::Reverse(token.len())))
        .ok_or_else(|| {
            format!("Invalid property filter {text:?}: expected PATH==VALUE (or !=, <, >, <=, >=)")
        })?;
    let (path, value) = (&text[..at], &text[at + token.len()..]);
    let mut segments = Vec::new();
    for segment in path.split('.') {
        let (name, array) = match segment.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (segment, false),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("Invalid property path {path:?} in filter {text:?}"));
        }
        segments.push((name.to_owned(), array));
    }
    let values: Vec<String> = value.split(',').map(str::to_owned).collect();
    if values.iter().any(String::is_empty) {
        return Err(format!("Empty value in property filter {text:?}"));
    }
    if matches!(op, Op::Lt | Op::Gt | Op::Le | Op::Ge)
        && (values.len() != 1 || values[0].parse::<f64>().is_err())
    {
        return Err(format!(
            "Property filter {text:?}: {token} compares with one number"
        ));
    }
    Ok(Filter {
        path: segments,
        op,
        values,
    })
}

fn parse_query(raw: Option<&str>) -> Result<Query, String> {
    let mut query = Query {
        filters: Vec::new(),
        filter_texts: Vec::new(),
        order: ("createdAt".to_owned(), false),
        limit: DEFAULT_LIMIT,
        count: false,
        token: None,
    };
    let mut seen = std::collections::HashSet::new();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if !PARAMETERS.contains(&key.as_ref()) {
            return Err(format!("Unknown query parameter {key:?}"));
        }
        if key != "property" && !seen.insert(key.to_string()) {
            return Err(format!("Query parameter {key:?} given twice"));
        }
        match key.as_ref() {
            "property" => {
                query.filters.push(parse_filter(&value)?);
                query.filter_texts.push(value.into_owned());
            }
            "limit" => {
                query.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit must be a whole number 1..={MAX_LIMIT}"))?;
            }
            "orderby" => {
                let (field, descending) = match value.strip_prefix('-') {
                    Some(field) => (field, true),
                    None => (value.as_ref(), false),
                };
                if !matches!(field, "name" | "createdAt") {
                    return Err(format!("Cannot order by {value:?}"));
                }
                query.order = (field.to_owned(), descending);
            }
            "count" => {
                query.count = match value.as_ref() {
                    "true" => true,
                    "false" => false,
                    _ => return Err("count must be true or false".to_owned()),
                };
            }
            "continuationToken" => {
                if value.is_empty() {
                    return Err("continuationToken is empty".to_owned());
                }
                query.token = Some(value.into_owned());
            }
            _ => {}
        }
    }
    query.filter_texts.sort();
    Ok(query)
}

/// Every value at `path` in `item` (arrays fanned out where marked `[]`).
fn values_at<'a>(item: &'a Value, path: &[(String, bool)]) -> Vec<&'a Value> {
    let Some(((name, array), rest)) = path.split_first() else {
        return vec![item];
    };
    let Some(next) = item.get(name) else {
        return Vec::new();
    };
    match (array, next) {
        (true, Value::Array(elements)) => {
            elements.iter().flat_map(|e| values_at(e, rest)).collect()
        }
        (true, _) => Vec::new(),
        (false, next) => values_at(next, rest),
    }
}

fn equals(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s == text,
        Value::Number(n) => text.parse::<f64>().ok() == n.as_f64(),
        Value::Bool(b) => text == if *b { "true" } else { "false" },
        _ => false,
    }
}

fn passes(item: &Value, filter: &Filter) -> bool {
    let found = values_at(item, &filter.path);
    match filter.op {
        Op::Eq => found
            .iter()
            .any(|v| filter.values.iter().any(|t| equals(v, t))),
        Op::Ne => !found
            .iter()
            .any(|v| filter.values.iter().any(|t| equals(v, t))),
        op => {
            let Some(bound) = filter.values.first().and_then(|t| t.parse::<f64>().ok()) else {
                return false;
            };
            found.iter().filter_map(|v| v.as_f64()).any(|n| match op {
                Op::Lt => n < bound,
                Op::Gt => n > bound,
                Op::Le => n <= bound,
                _ => n >= bound,
            })
        }
    }
}

/// Where a connection sits in the query's order: its sort field, then its
/// id, so the order is total and keyset paging neither skips nor repeats.
/// Borrowed from the stored connection: ordering a sandbox copies nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field<'a> {
    Created(u64),
    Name(&'a str),
}

type Key<'a> = (Field<'a>, &'a str);

/// An entry of the creation index ([`SimState::by_creation`]) as a key.
fn index_key((created, id): &(u64, String)) -> Key<'_> {
    (Field::Created(*created), id)
}

fn key_of<'a>(conn: &'a Conn, by_name: bool) -> Key<'a> {
    let field = if by_name {
        Field::Name(&conn.spec.name)
    } else {
        Field::Created(conn.created_at_ms)
    };
    (field, &conn.spec.id)
}

/// A token names the query it belongs to and the last item handed out.
fn encode_token(sandbox: &str, query: &Query, last: Key<'_>) -> String {
    let field = match last.0 {
        Field::Created(ms) => json!(ms),
        Field::Name(name) => json!(name),
    };
    let text = json!([
        sandbox,
        query.filter_texts,
        query.order.0,
        query.order.1,
        field,
        last.1
    ])
    .to_string();
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Option<Value> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    serde_json::from_slice(&bytes?).ok()
}

/// Why a continuation token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenFault {
    /// Not a token this server wrote.
    NotOurs,
    /// Ours, but from a query with other filters, order or sandbox.
    OtherQuery,
}

impl TokenFault {
    /// The recorded violation and the 400's detail.
    fn texts(self) -> (&'static str, &'static str) {
        match self {
            Self::NotOurs => (
                "continuationToken was not issued by this server",
                "Invalid continuationToken",
            ),
            Self::OtherQuery => (
                "continuationToken used with other filters, order or sandbox than the query it came from",
                "The continuationToken does not belong to this query; send the same property and orderby parameters",
            ),
        }
    }
}

/// The last key a decoded token handed out, if it belongs to the query
/// `expected` describes (`[sandbox, filters, field, descending]`).
fn token_key<'t>(
    decoded: Option<&'t Value>,
    expected: &Value,
    by_name: bool,
) -> Result<Key<'t>, TokenFault> {
    let Some([query @ .., field, id]) = decoded.and_then(Value::as_array).map(Vec::as_slice) else {
        return Err(TokenFault::NotOurs);
    };
    if query.len() != 4 {
        return Err(TokenFault::NotOurs);
    }
    if Some(query) != expected.as_array().map(Vec::as_slice) {
        return Err(TokenFault::OtherQuery);
    }
    let field = if by_name {
        field.as_str().map(Field::Name)
    } else {
        field.as_u64().map(Field::Created)
    };
    let (Some(field), Some(id)) = (field, id.as_str()) else {
        return Err(TokenFault::NotOurs);
    };
    Ok((field, id))
}

/// Answers `GET /connections` in `sandbox` (headers already checked): the
/// page's JSON, which the caller serializes after releasing the state lock
/// (80 items take about a millisecond to write, and every other request
/// waits for that lock), or an error answer.
pub(super) fn answer(
    st: &mut SimState,
    parts: &Parts,
    sandbox: &str,
    client_id: &str,
    org_id: &str,
) -> Result<Value, Box<Response>> {
    let what = format!("Flow GET {}", parts.uri.path());
    let query = match parse_query(parts.uri.query()) {
        Ok(query) => query,
        Err(detail) => {
            st.violation(format!("{what}: {detail}"));
            return Err(Box::new(flow_error(400, "Bad Request", &detail)));
        }
    };
    // The token is checked first; then the sandbox's connections are
    // ordered by borrowed keys (no copies, no JSON) and JSON is built only
    // while filling the page: every other request waits for the state lock
    // meanwhile, and a rule's listing of 10,000 connections is 100 pages.
    let by_name = query.order.0 == "name";
    let descending = query.order.1;
    let decoded = query.token.as_deref().map(decode_token);
    let last = match &decoded {
        None => None,
        Some(decoded) => {
            let expected = json!([sandbox, query.filter_texts, query.order.0, query.order.1]);
            match token_key(decoded.as_ref(), &expected, by_name) {
                Ok(key) => Some(key),
                Err(fault) => {
                    let (violation, detail) = fault.texts();
                    st.violation(format!("{what}: {violation}"));
                    return Err(Box::new(flow_error(400, "Bad Request", detail)));
                }
            }
        }
    };
    let ordered = |a: &Key<'_>, b: &Key<'_>| {
        if descending { b.cmp(a) } else { a.cmp(b) }
    };
    // Items at or before the token's, already handed out: skipped, or with
    // `count=true` still counted.
    let handed_out =
        |key: &Key<'_>| last.is_some_and(|last| ordered(key, &last) != Ordering::Greater);
    // An `id==a,b,c` filter is applied on the id before the item is built:
    // the same answer (the item's `id` is the connection's id), without
    // building and sorting every item of the sandbox for each 80-id call.
    let wanted_ids: Option<std::collections::HashSet<&str>> = query
        .filters
        .iter()
        .find(|f| matches!((f.op, f.path.as_slice()), (Op::Eq, [(name, false)]) if name == "id"))
        .map(|f| f.values.iter().map(String::as_str).collect());
    let (members, connections) = st.by_creation(sandbox);
    let candidates: Box<dyn Iterator<Item = (Key<'_>, &Conn)>> = match &wanted_ids {
        // The default order, a page at a time: straight from the creation
        // index, from the token on, so a page touches its own items only.
        None if !by_name && !query.count => {
            let lookup =
                |(_, id): &(u64, String)| connections.get(id).map(|c| (key_of(c, false), c));
            if descending {
                let end = last.map_or(members.len(), |last| {
                    members.partition_point(|m| index_key(m) < last)
                });
                Box::new(members[..end].iter().rev().filter_map(lookup))
            } else {
                let start =
                    last.map_or(0, |last| members.partition_point(|m| index_key(m) <= last));
                Box::new(members[start..].iter().filter_map(lookup))
            }
        }
        // Otherwise the candidates are keyed and sorted; an `id==` filter
        // looks its ids up instead of going through the sandbox (a first
        // pass lists 10,000 connections in 128 such calls).
        _ => {
            let found: Box<dyn Iterator<Item = &Conn>> = match &wanted_ids {
                Some(ids) => Box::new(
                    ids.iter()
                        .filter_map(|id| connections.get(*id))
                        .filter(|c| c.spec.sandbox == sandbox),
                ),
                None => Box::new(members.iter().filter_map(|(_, id)| connections.get(id))),
            };
            // Keyset paging: items created or deleted meanwhile shift nothing.
            let mut keyed: Vec<(Key<'_>, &Conn)> = found
                .map(|c| (key_of(c, by_name), c))
                .filter(|(key, _)| query.count || !handed_out(key))
                .collect();
            // Keys are unique (the id breaks ties): an unstable sort is exact.
            keyed.sort_unstable_by(|a, b| ordered(&a.0, &b.0));
            Box::new(keyed.into_iter())
        }
    };
    let mut page: Vec<Value> = Vec::new();
    let mut page_last = None;
    let mut more = false;
    let mut total = 0usize;
    for (key, conn) in candidates {
        let counted_before = handed_out(&key);
        if counted_before && !query.count {
            continue;
        }
        let item = connection_item(conn, client_id, org_id);
        if !query.filters.iter().all(|f| passes(&item, f)) {
            continue;
        }
        total += 1;
        if counted_before {
            continue;
        }
        if page.len() < query.limit {
            page.push(item);
            page_last = Some(key);
        } else {
            more = true;
            if !query.count {
                break;
            }
        }
    }
    // Not `json!({"items": page})`: that serializes the page into a second
    // copy (under the state lock).
    let mut body = Value::Object(serde_json::Map::from_iter([(
        "items".to_owned(),
        Value::Array(page),
    )]));
    if let (true, Some(last)) = (more, page_last) {
        let token = encode_token(sandbox, &query, last);
        body["_links"] = json!({
            "next": { "href": format!("/connections?continuationToken={token}") }
        });
    }
    if query.count {
        body["count"] = json!(total);
    }
    st.counters.flow_lists += 1;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_strictly() {
        let f = parse_filter("connectionSpec.id==a,b").unwrap();
        assert_eq!(f.op, Op::Eq);
        assert_eq!(f.values, ["a", "b"]);
        assert_eq!(parse_filter("createdAt>=5").unwrap().op, Op::Ge);
        assert_eq!(parse_filter("state!=enabled").unwrap().op, Op::Ne);
        for bad in [
            "name",
            "name=x",
            "==x",
            "a..b==x",
            "name==",
            "createdAt<x",
            "na me==x",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
        assert!(parse_query(Some("foo=1")).is_err());
        assert!(parse_query(Some("limit=0")).is_err());
        assert!(parse_query(Some("orderby=updatedAt")).is_err());
        assert!(parse_query(Some("limit=2&limit=3")).is_err());
    }

    #[test]
    fn a_token_is_read_only_for_its_own_query() {
        let expected = json!(["prod", ["connectionSpec.id==x"], "name", false]);
        let ours = json!(["prod", ["connectionSpec.id==x"], "name", false, "b", "id-2"]);
        assert_eq!(
            token_key(Some(&ours), &expected, true),
            Ok((Field::Name("b"), "id-2"))
        );
        let other = json!(["dev", ["connectionSpec.id==x"], "name", false, "b", "id-2"]);
        assert_eq!(
            token_key(Some(&other), &expected, true),
            Err(TokenFault::OtherQuery)
        );
        // Forged: a number where the name goes, a short array, not JSON.
        let forged = json!(["prod", ["connectionSpec.id==x"], "name", false, 7, "id-2"]);
        let short = json!(["prod", "name", false, "b", "id-2"]);
        for bad in [Some(&forged), Some(&short), None] {
            assert_eq!(token_key(bad, &expected, true), Err(TokenFault::NotOurs));
        }
        // A token round-trips through its text.
        let query = parse_query(Some("orderby=-createdAt&limit=3")).unwrap();
        let text = encode_token("prod", &query, (Field::Created(12), "id-9"));
        let decoded = decode_token(&text);
        let expected = json!(["prod", query.filter_texts, "createdAt", true]);
        assert_eq!(
            token_key(decoded.as_ref(), &expected, false),
            Ok((Field::Created(12), "id-9"))
        );
    }

    #[test]
    fn nested_paths_and_arrays() {
        let item =
            json!({"auth": {"specName": "Access Key"}, "tags": [{"k": "x"}, {"k": "y"}], "n": 5});
        assert!(passes(
            &item,
            &parse_filter("auth.specName==Access Key").unwrap()
        ));
        assert!(passes(&item, &parse_filter("tags[].k==y").unwrap()));
        assert!(!passes(&item, &parse_filter("tags[].k!=y").unwrap()));
        assert!(passes(&item, &parse_filter("n<6").unwrap()));
        assert!(!passes(&item, &parse_filter("missing==x").unwrap()));
    }
}
