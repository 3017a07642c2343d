//! Flow Service's wire format: the documents it answers (one connection,
//! a list page, a created connection) read leniently and checked, the
//! bodies it is sent, and the useful line of an error answer.

use std::borrow::Cow;

use super::*;

/// Reads `items[0]` of a `GET /connections/{id}` answer and checks it is an S3
/// connection with the `Access Key` auth spec.
pub fn parse_connection(body: &[u8]) -> Result<RemoteConnection, FlowError> {
    let wrapper: ListWrapper = serde_json::from_slice(body).map_err(|e| {
        // serde's message may quote a value from the body: scrub and bound it.
        FlowError::Malformed(crate::remote::http::remote_text(&format!(
            "GET answer is not {{\"items\": [...]}} JSON: {e}"
        )))
    })?;
    let item = wrapper.items.into_iter().next().ok_or_else(|| {
        FlowError::Malformed("GET answered an empty items list; check the connection id".to_owned())
    })?;
    let etag = item
        .get("etag")
        .and_then(Value::as_str)
        .filter(|etag| !etag.is_empty())
        .ok_or_else(|| FlowError::Malformed("GET answer has no etag".to_owned()))?;
    // It goes back in `If-Match`: one that cannot be sent is never kept.
    if !crate::ident::is_valid_etag(etag) {
        return Err(FlowError::Malformed(format!(
            "GET answer has an etag that is not a valid header value ({}); it is not kept",
            crate::remote::http::bounded(etag, 80)
        )));
    }
    let spec = item.pointer("/connectionSpec/id").and_then(Value::as_str);
    if !is_s3_spec(spec) {
        let spec = spec.unwrap_or("(none)");
        return Err(FlowError::Unsuitable(format!(
            "its connection spec is {}, not Amazon S3 ({S3_CONNECTION_SPEC_ID}); check the id",
            crate::remote::http::bounded(spec, 80)
        )));
    }
    let auth = item.pointer("/auth/specName").and_then(Value::as_str);
    if !is_access_key_auth(auth) {
        let auth = auth.unwrap_or("(none)");
        return Err(FlowError::Unsuitable(format!(
            "its auth spec is \"{}\", not \"Access Key\"; only access-key connections hold temporary credentials",
            crate::remote::http::bounded(auth, 80)
        )));
    }
    Ok(RemoteConnection {
        etag: etag.to_owned(),
        name: item
            .get("name")
            .and_then(Value::as_str)
            .map(crate::ident::remote_name),
        s3: s3_target(&item),
    })
}

/// `auth.params` `bucketName` / `folderPath` / `serviceUrl` of a connection
/// `GET` answer; `None` without a `bucketName`.
pub(super) fn s3_target(item: &Value) -> Option<S3Target> {
    let params = item.pointer("/auth/params")?;
    let param = |name: &str| params.get(name).and_then(Value::as_str);
    s3_target_of(
        param("bucketName"),
        param("folderPath"),
        param("serviceUrl"),
    )
}

/// The S3 target of a connection's parameters, each trimmed (blank =
/// absent); `None` without a bucket.
pub(super) fn s3_target_of(
    bucket: Option<&str>,
    folder: Option<&str>,
    service_url: Option<&str>,
) -> Option<S3Target> {
    let given = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    given(bucket).map(|bucket| S3Target {
        bucket,
        folder: given(folder),
        service_url: given(service_url),
    })
}

/// What `POST /connections` creates besides the credentials: the non-secret
/// parts of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConnection {
    /// `name` (non-empty).
    pub name: String,
    /// `description`, sent only when given.
    pub description: Option<String>,
    /// `auth.params.bucketName`.
    pub bucket: String,
    /// `auth.params.folderPath`, sent only when given.
    pub folder: Option<String>,
    /// `auth.params.serviceUrl`, sent only when given.
    pub service_url: Option<String>,
}

/// The answer to `POST /connections`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedConnection {
    /// The new base connection id.
    pub id: String,
    /// Its etag, with literal quotes, for the first `If-Match`: the body's
    /// `etag`, else the `ETag` header; `None` when neither is usable (the
    /// connection exists all the same; the daemon reads it with `GET`).
    pub etag: Option<String>,
}

/// The `POST /connections` body of the S3 tutorial: the three credentials,
/// the bucket, and only the optional values that were given.
pub fn create_body(new: &NewConnection, credentials: &AwsCredentials) -> Value {
    let mut params = serde_json::Map::new();
    params.insert("s3AccessKey".into(), json!(credentials.access_key_id));
    params.insert(
        "s3SecretKey".into(),
        json!(credentials.secret_access_key.expose_secret()),
    );
    params.insert(
        "s3SessionToken".into(),
        json!(credentials.session_token.expose_secret()),
    );
    params.insert("bucketName".into(), json!(new.bucket));
    if let Some(folder) = &new.folder {
        params.insert("folderPath".into(), json!(folder));
    }
    if let Some(url) = &new.service_url {
        params.insert("serviceUrl".into(), json!(url));
    }
    let mut body = serde_json::Map::new();
    body.insert("name".into(), json!(new.name));
    if let Some(description) = &new.description {
        body.insert("description".into(), json!(description));
    }
    body.insert(
        "auth".into(),
        json!({"specName": ACCESS_KEY_AUTH_SPEC, "params": params}),
    );
    body.insert(
        "connectionSpec".into(),
        json!({"id": S3_CONNECTION_SPEC_ID, "version": "1.0"}),
    );
    Value::Object(body)
}

/// Reads `{"id", "etag"}` of a `POST /connections` answer, checked: an id
/// that can go in a path, an etag that can go back in `If-Match` (from the
/// body, else `etag_header`). A 2xx with a usable id means created: a
/// missing etag is not a failure (a script that retried `create` on it
/// would make a second connection).
pub fn parse_created(
    body: &[u8],
    etag_header: Option<&str>,
) -> Result<CreatedConnection, FlowError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        FlowError::Malformed(crate::remote::http::remote_text(&format!(
            "create answer is not JSON: {e}"
        )))
    })?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| crate::ident::is_connection_id(id))
        .ok_or_else(|| {
            FlowError::Malformed(
                "create answer has no usable \"id\"; look for the connection in the Platform UI before creating it again".to_owned(),
            )
        })?;
    let etag = value
        .get("etag")
        .and_then(Value::as_str)
        .filter(|etag| crate::ident::is_valid_etag(etag))
        .or_else(|| etag_header.filter(|etag| crate::ident::is_valid_etag(etag)))
        .map(str::to_owned);
    Ok(CreatedConnection {
        id: id.to_owned(),
        etag,
    })
}

/// One page of `GET /connections`: its usable items and the next page's
/// continuation token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Items with an id and an etag.
    pub items: Vec<ListedConnection>,
    /// From `_links.next.href`; `None` = last page.
    pub next: Option<String>,
}

/// Parses a `GET /connections` page leniently (unknown fields skipped, a
/// field of the wrong type read as absent, unusable items skipped) but
/// checks what is used. Typed, not through `serde_json::Value`: only the
/// fields used are built.
pub fn parse_list_page(body: &[u8]) -> Result<ListPage, FlowError> {
    use crate::remote::lenient::{Array, Object, Text};

    // Strings are borrowed from `body` where they can be: most are checked,
    // cut or copied into something else, not kept as read.
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Page<'a> {
        #[serde(borrow)]
        items: Array<Object<Item<'a>>>,
        #[serde(rename = "_links")]
        links: Object<Links>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Links {
        next: Object<Next>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Next {
        href: Option<Value>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Item<'a> {
        #[serde(borrow)]
        id: Text<'a>,
        #[serde(borrow)]
        etag: Text<'a>,
        #[serde(borrow)]
        name: Text<'a>,
        #[serde(borrow)]
        description: Text<'a>,
        #[serde(borrow)]
        state: Text<'a>,
        #[serde(borrow)]
        auth: Object<Auth<'a>>,
        #[serde(rename = "connectionSpec", borrow)]
        connection_spec: Object<Spec<'a>>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Auth<'a> {
        #[serde(rename = "specName", borrow)]
        spec_name: Text<'a>,
        #[serde(borrow)]
        params: Object<Params<'a>>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Params<'a> {
        #[serde(rename = "bucketName", borrow)]
        bucket_name: Text<'a>,
        #[serde(rename = "folderPath", borrow)]
        folder_path: Text<'a>,
        #[serde(rename = "serviceUrl", borrow)]
        service_url: Text<'a>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Spec<'a> {
        #[serde(borrow)]
        id: Text<'a>,
    }

    let Object(page) = serde_json::from_slice::<Object<Page>>(body)
        .map_err(|e| FlowError::Malformed(format!("list answer is not JSON: {e}")))?;
    let Some(Page {
        items: Array(Some(items)),
        links,
    }) = page
    else {
        return Err(FlowError::Malformed(
            "list answer has no \"items\" array".to_owned(),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for Object(item) in items {
        let Some(item) = item else {
            tracing::debug!("list item that is not an object skipped");
            continue;
        };
        // Only what matching and the job need is kept, each part checked or
        // bounded (issue 26): a page is 1 MiB, a listing up to
        // `MAX_LISTED_ITEMS` of these.
        let id = item.id.0.filter(|id| crate::ident::is_connection_id(id));
        let etag = item.etag.0.filter(|etag| crate::ident::is_valid_etag(etag));
        let (Some(id), Some(etag)) = (id, etag) else {
            tracing::debug!("list item without a usable id or etag skipped");
            continue;
        };
        let auth = item.auth.0.unwrap_or_default();
        out.push(ListedConnection {
            id: id.into_owned(),
            etag: etag.into_owned(),
            name: item.name.0.as_deref().map(crate::ident::remote_name),
            description: item
                .description
                .0
                .as_deref()
                .map(|d| cut(d, MAX_LISTED_DESCRIPTION)),
            auth_spec: auth.spec_name.0.as_deref().map(|s| cut(s, MAX_LISTED_WORD)),
            state: item.state.0.as_deref().map(|s| cut(s, MAX_LISTED_WORD)),
            connection_spec_id: item
                .connection_spec
                .0
                .and_then(|spec| spec.id.0)
                .as_deref()
                .map(|s| cut(s, MAX_LISTED_WORD)),
            s3: auth.params.0.and_then(|params| {
                let fits = |v: &Option<Cow<'_, str>>, max: usize| {
                    v.as_ref().is_none_or(|v| v.len() <= max)
                };
                // A target that cannot be real is not kept: the job GETs.
                (fits(&params.bucket_name.0, MAX_LISTED_BUCKET)
                    && fits(&params.folder_path.0, MAX_LISTED_FOLDER)
                    && fits(&params.service_url.0, MAX_LISTED_URL))
                .then(|| {
                    s3_target_of(
                        params.bucket_name.0.as_deref(),
                        params.folder_path.0.as_deref(),
                        params.service_url.0.as_deref(),
                    )
                })
                .flatten()
            }),
        });
    }
    let href = links
        .0
        .and_then(|links| links.next.0)
        .and_then(|next| next.href);
    let next = match href {
        None | Some(Value::Null) => None,
        // An empty link is no link: some servers keep the key on the last page.
        Some(Value::String(href)) if href.trim().is_empty() => None,
        Some(Value::String(href)) => Some(continuation_token(&href)?),
        Some(_) => {
            return Err(FlowError::Malformed(
                "list answer's _links.next.href is not a string".to_owned(),
            ));
        }
    };
    Ok(ListPage { items: out, next })
}

/// The most bytes of a listed description that are kept: it is only
/// searched for a rule's `description_tag` (never shown), and a tag is a
/// word near the start; 1 KiB keeps a listing's memory bounded.
pub const MAX_LISTED_DESCRIPTION: usize = 1024;
/// The most bytes kept of a listed `state`, `auth.specName` or
/// `connectionSpec.id`: only compared with short known values.
pub(super) const MAX_LISTED_WORD: usize = 64;
/// S3's longest bucket name (legacy us-east-1 names).
pub(super) const MAX_LISTED_BUCKET: usize = 255;
/// S3's longest key is 1,024 bytes; a folder is a prefix of one.
pub(super) const MAX_LISTED_FOLDER: usize = 1024;
/// A `serviceUrl` is a host and a scheme; 2 KiB is far beyond any real one.
pub(super) const MAX_LISTED_URL: usize = 2048;

/// The connections one listing may keep: 20,000 is twice the largest
/// deployment this daemon is built for (10,000 connections); more means a
/// server looping or padding. Beyond it the listing fails and the
/// sandbox keeps its last known set.
pub const MAX_LISTED_ITEMS: usize = 20_000;
/// The bytes one listing may keep (the strings of its items, see
/// [`ListedConnection::footprint`]): 10,000 real items are about 1.5 MiB;
/// 4 MiB leaves room for long names and descriptions and keeps a sandbox
/// listing, alive or as its last known set, well inside a small container
/// (sandboxes list side by side).
pub const MAX_LISTED_BYTES: usize = 4 << 20;
/// The bytes of answers one listing may read (kept or not): 200 full pages.
/// A padded or endless listing fails here instead of reading 1,000 MiB.
pub const MAX_LISTING_READ: usize = 200 << 20;

/// `text` cut to at most `max` bytes, at a character boundary, as an
/// owned copy of only what is kept.
pub(super) fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The longest continuation token followed: every token of a listing is
/// remembered (to catch a loop), so its size is bounded; real ones are a
/// few hundred bytes.
pub(super) const MAX_CONTINUATION_TOKEN: usize = 4096;

/// The `continuationToken` query parameter of a next-page href (relative,
/// like `/connections?continuationToken=...`, or absolute).
pub(super) fn continuation_token(href: &str) -> Result<String, FlowError> {
    let base = Url::parse("http://flowservice.invalid/")
        .map_err(|e| FlowError::Malformed(format!("cannot build a base URL: {e}")))?;
    let url = base.join(href).map_err(|e| {
        FlowError::Malformed(format!(
            "next-page href {} is not a URL: {e}",
            crate::remote::http::bounded(href, 80)
        ))
    })?;
    url.query_pairs()
        .find(|(k, _)| k == "continuationToken")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty() && v.len() <= MAX_CONTINUATION_TOKEN)
        .ok_or_else(|| {
            FlowError::Malformed(format!(
                "next-page href {} has no usable continuationToken",
                crate::remote::http::bounded(href, 80)
            ))
        })
}

/// The most useful line of an error body: Flow Service's `detailed-message`
/// or `title`, the gateway's `error_code`/`message`, or the start of the body.
pub(super) fn remote_detail(body: &[u8]) -> String {
    // Not cut here: the caller scrubs secrets first, then bounds the text
    // (cutting first could leave the prefix of an echoed secret).
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body).into_owned();
        return if text.trim().is_empty() {
            "empty body".to_owned()
        } else {
            text
        };
    };
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(message) = text("/report/detailed-message").or_else(|| text("/title")) {
        return message;
    }
    if let Some(message) = text("/message") {
        return match text("/error_code") {
            Some(code) => format!("{message} (error_code {code})"),
            None => message,
        };
    }
    text("/errorMessage").unwrap_or_else(|| value.to_string())
}
