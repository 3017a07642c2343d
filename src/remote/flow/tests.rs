//! The Flow client against the simulator, and its wire format.

use super::*;

fn item(spec: &str, auth: &str) -> String {
    json!({"items": [{
        "id": "c1", "name": "S3", "etag": "\"1700d77b-0000\"",
        "connectionSpec": {"id": spec, "version": "1.0"},
        "auth": {"specName": auth, "params": {"bucketName": "b"}}
    }]})
    .to_string()
}

#[test]
fn reads_items_0_and_keeps_the_etag_quotes() {
    let parsed = parse_connection(item(S3_CONNECTION_SPEC_ID, "Access Key").as_bytes()).unwrap();
    assert_eq!(parsed.etag, "\"1700d77b-0000\"");
    assert_eq!(
        parsed.s3,
        Some(S3Target {
            bucket: "b".into(),
            folder: None,
            service_url: None
        })
    );
}

#[test]
fn keeps_the_non_secret_s3_parameters_only() {
    let body = json!({"items": [{
        "etag": "\"e\"",
        "connectionSpec": {"id": S3_CONNECTION_SPEC_ID},
        "auth": {"specName": "Access Key", "params": {
            "bucketName": "sales", "folderPath": "/landing", "serviceUrl": "https://s3.eu-west-1.amazonaws.com",
            "s3AccessKey": "AKIAEXAMPLE", "s3SecretKey": "never-kept-secret"
        }}
    }]});
    let parsed = parse_connection(body.to_string().as_bytes()).unwrap();
    let target = parsed.s3.unwrap();
    assert_eq!(target.bucket, "sales");
    assert_eq!(target.folder.as_deref(), Some("/landing"));
    assert_eq!(
        target.service_url.as_deref(),
        Some("https://s3.eu-west-1.amazonaws.com")
    );
    assert!(!format!("{target:?}").contains("never-kept-secret"));
    // No bucket: nothing to check against.
    let body = item(S3_CONNECTION_SPEC_ID, "Access Key").replace("\"bucketName\":\"b\"", "");
    assert_eq!(parse_connection(body.as_bytes()).unwrap().s3, None);
}

#[test]
fn refuses_non_s3_and_non_access_key_connections() {
    let err = parse_connection(item("other-spec", "Access Key").as_bytes()).unwrap_err();
    assert!(
        matches!(err, FlowError::Unsuitable(ref m) if m.contains("other-spec")),
        "{err}"
    );
    let err =
        parse_connection(item(S3_CONNECTION_SPEC_ID, "IAMRole Based").as_bytes()).unwrap_err();
    assert!(
        matches!(err, FlowError::Unsuitable(ref m) if m.contains("IAMRole Based")),
        "{err}"
    );
}

#[test]
fn spec_auth_and_state_are_compared_without_regard_to_case() {
    let upper = S3_CONNECTION_SPEC_ID.to_ascii_uppercase();
    for (spec, auth) in [
        (upper.as_str(), "access key"),
        (S3_CONNECTION_SPEC_ID, " ACCESS KEY "),
    ] {
        parse_connection(item(spec, auth).as_bytes()).unwrap();
    }
    let listed = |spec: &str, auth: &str, state: Option<&str>| ListedConnection {
        id: "a".to_owned(),
        etag: "\"e\"".to_owned(),
        name: None,
        description: None,
        auth_spec: Some(auth.to_owned()),
        state: state.map(str::to_owned),
        connection_spec_id: Some(spec.to_owned()),
        s3: None,
    };
    assert!(listed(&upper, "Access key", Some("Enabled")).is_rotatable_s3());
    assert!(listed(S3_CONNECTION_SPEC_ID, "Access Key", Some("ENABLED")).is_rotatable_s3());
    for (spec, auth, state) in [
        (S3_CONNECTION_SPEC_ID, "Access Key", Some("disabled")),
        (S3_CONNECTION_SPEC_ID, "Access Key", None),
        (S3_CONNECTION_SPEC_ID, "Access Keys", Some("enabled")),
        ("ecadc60c", "Access Key", Some("enabled")),
    ] {
        assert!(
            !listed(spec, auth, state).is_rotatable_s3(),
            "{spec} {auth} {state:?}"
        );
    }
    assert!(listed(S3_CONNECTION_SPEC_ID, "Access Key", None).is_s3_access_key());
}

#[test]
fn unexpected_shapes_are_malformed() {
    for body in [
        "not json",
        "{\"items\": []}",
        "{\"items\": [{\"id\": \"x\"}]}",
        "{\"id\": \"x\"}",
    ] {
        let err = parse_connection(body.as_bytes()).unwrap_err();
        assert!(matches!(err, FlowError::Malformed(_)), "{body}: {err}");
    }
}

#[test]
fn listed_items_keep_only_bounded_checked_parts() {
    // Issue 26 #1, #2, #3: ids `.`/`..` and of 3,000 characters were
    // kept; names and descriptions were kept whole and raw.
    let huge = "p".repeat(300_000);
    let body = serde_json::json!({"items": [
        {"id": ".", "etag": "\"e\""},
        {"id": "..", "etag": "\"e\""},
        {"id": "x".repeat(3000), "etag": "\"e\""},
        {"id": "ok", "etag": "bad\netag"},
        {"id": "kept", "etag": "\"e\"",
         "name": format!("n\n{{\"message\":\"credentials rotated\"}}\u{1b}]0;t\u{7}{huge}"),
         "description": format!("rotate:aep-s3 {huge}"),
         "state": huge.clone(),
         "auth": {"specName": "Access Key", "params": {"bucketName": huge.clone()}}}
    ]})
    .to_string();
    let page = parse_list_page(body.as_bytes()).unwrap();
    assert_eq!(
        page.items.len(),
        1,
        "{:?}",
        page.items.iter().map(|i| i.id.len()).collect::<Vec<_>>()
    );
    let item = &page.items[0];
    let name = item.name.as_deref().unwrap();
    assert!(!name.chars().any(char::is_control), "{name}");
    assert!(name.len() < 300, "{}", name.len());
    assert!(
        item.description
            .as_deref()
            .unwrap()
            .starts_with("rotate:aep-s3 ")
    );
    assert!(item.footprint() < 4096, "{}", item.footprint());
    assert_eq!(
        item.s3, None,
        "a bucket name no bucket can have is not kept"
    );
}

/// Words and descriptions are cut at a character boundary, whether the
/// text was borrowed from the page or unescaped into a copy.
#[test]
fn listed_text_is_cut_at_a_character_boundary() {
    // "x" then two-byte characters: byte 1,024 falls inside one.
    let plain = format!("x{}", "\u{e9}".repeat(1000));
    let escaped = format!("x{}", r"\u00e9".repeat(1000));
    for (description, state) in [(plain.clone(), plain), (escaped.clone(), escaped)] {
        let body = format!(
            r#"{{"items": [{{"id": "kept", "etag": "\"e\"", "description": "{description}", "state": "{state}"}}]}}"#
        );
        let page = parse_list_page(body.as_bytes()).unwrap();
        let item = &page.items[0];
        let description = item.description.as_deref().unwrap();
        assert_eq!(description.len(), 1023, "cut before the split character");
        assert!(description.starts_with("x\u{e9}"));
        assert_eq!(item.state.as_deref().unwrap().len(), 63);
    }
}

#[test]
fn list_pages_parse_leniently_and_keep_what_is_used() {
    let body = json!({
        "items": [
            {"id": "a", "etag": "\"e1\"", "name": "ingest-a", "description": "rotate:aep-s3",
             "state": "enabled", "connectionSpec": {"id": S3_CONNECTION_SPEC_ID},
             "auth": {"specName": "Access Key"}, "extra": [1, 2]},
            {"id": "", "etag": "\"x\""},
            {"id": "no-etag"},
            {"id": "b/../c", "etag": "\"x\""},
            {"id": "d", "etag": "\"e2\"", "state": "disabled"},
            "not an object"
        ],
        "_links": {"next": {"href": "/connections?continuationToken=tok%3D1&limit=2"}}
    });
    let page = parse_list_page(body.to_string().as_bytes()).unwrap();
    assert_eq!(page.next.as_deref(), Some("tok=1"));
    assert_eq!(page.items.len(), 2);
    assert!(page.items[0].is_rotatable_s3());
    assert_eq!(page.items[0].etag, "\"e1\"");
    assert!(!page.items[1].is_rotatable_s3());
    for last in [
        r#"{"items": [], "_links": {}}"#,
        r#"{"items": [], "_links": {"next": null}}"#,
        r#"{"items": [], "_links": {"next": {"href": null}}}"#,
        r#"{"items": [], "_links": {"next": {"href": ""}}}"#,
        r#"{"items": []}"#,
    ] {
        assert_eq!(
            parse_list_page(last.as_bytes()).unwrap().next,
            None,
            "{last}"
        );
    }
    for bad in [
        r#"{"items": {}}"#,
        "[]",
        r#"{"items": [], "_links": {"next": {"href": "/connections?limit=2"}}}"#,
        r#"{"items": [], "_links": {"next": {"href": 5}}}"#,
        // A key given twice is ambiguous: the page is refused (the
        // listing then counts as failed and drops nothing).
        r#"{"items": [{"id": "a", "id": "b", "etag": "\"e\""}]}"#,
    ] {
        assert!(
            matches!(
                parse_list_page(bad.as_bytes()),
                Err(FlowError::Malformed(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn create_body_is_the_tutorials_with_only_the_given_options() {
    let credentials = AwsCredentials {
        access_key_id: "ASIAEXAMPLE".into(),
        secret_access_key: "sk".to_owned().into(),
        session_token: "st".to_owned().into(),
        expiration: std::time::SystemTime::UNIX_EPOCH,
    };
    let mut new = NewConnection {
        name: "n".into(),
        description: None,
        bucket: "b-1".into(),
        folder: None,
        service_url: None,
    };
    assert_eq!(
        create_body(&new, &credentials),
        json!({"name": "n",
            "auth": {"specName": "Access Key", "params": {
                "s3AccessKey": "ASIAEXAMPLE", "s3SecretKey": "sk", "s3SessionToken": "st",
                "bucketName": "b-1"}},
            "connectionSpec": {"id": S3_CONNECTION_SPEC_ID, "version": "1.0"}})
    );
    new.description = Some("d".into());
    new.folder = Some("in/".into());
    new.service_url = Some("https://s3.eu-west-1.amazonaws.com".into());
    let body = create_body(&new, &credentials);
    assert_eq!(body["description"], "d");
    assert_eq!(body["auth"]["params"]["folderPath"], "in/");
    assert_eq!(
        body["auth"]["params"]["serviceUrl"],
        "https://s3.eu-west-1.amazonaws.com"
    );
}

#[test]
fn created_answers_are_checked() {
    let ok = parse_created(br#"{"id": "69f188b6", "etag": "\"6802064a-0000\""}"#, None).unwrap();
    assert_eq!(ok.id, "69f188b6");
    assert_eq!(ok.etag.as_deref(), Some("\"6802064a-0000\""));
    for bad in [
        "nope",
        "{}",
        r#"{"id": "", "etag": "\"e\""}"#,
        r#"{"id": "a/../b", "etag": "\"e\""}"#,
        r#"{"id": "..", "etag": "\"e\""}"#,
        r#"{"id": "a\u001b[2J", "etag": "\"e\""}"#,
    ] {
        assert!(
            matches!(
                parse_created(bad.as_bytes(), None),
                Err(FlowError::Malformed(_))
            ),
            "{bad}"
        );
    }
    let long = format!(r#"{{"id": "{}"}}"#, "x".repeat(3000));
    assert!(parse_created(long.as_bytes(), None).is_err());
}

#[test]
fn a_created_answer_with_an_id_is_created_whatever_its_etag() {
    // Issue 26 #5: a 201 with an id but no body etag was a failure.
    let header = parse_created(br#"{"id": "a"}"#, Some("\"h\"")).unwrap();
    assert_eq!(header.etag.as_deref(), Some("\"h\""));
    let none = parse_created(br#"{"id": "a"}"#, None).unwrap();
    assert_eq!((none.id.as_str(), none.etag), ("a", None));
    let bad = parse_created(br#"{"id": "a", "etag": "bad\netag"}"#, None).unwrap();
    assert_eq!(bad.etag, None);
}

#[test]
fn filters_render_as_documented() {
    assert_eq!(
        PropertyFilter::s3().render().unwrap(),
        format!("connectionSpec.id=={S3_CONNECTION_SPEC_ID}")
    );
    assert_eq!(PropertyFilter::ids(["a", "b"]).render().unwrap(), "id==a,b");
    assert!(PropertyFilter::ids(["a,b"]).render().is_err());
    assert!(PropertyFilter::ids([]).render().is_err());
}

#[test]
fn remote_detail_prefers_the_documented_fields() {
    let flow = br#"{"type":"x","title":"Not Found","status":404,"report":{"detailed-message":"Connection c1 not found"}}"#;
    assert_eq!(remote_detail(flow), "Connection c1 not found");
    let gateway = br#"{"error_code":"401013","message":"Oauth token is not valid"}"#;
    assert_eq!(
        remote_detail(gateway),
        "Oauth token is not valid (error_code 401013)"
    );
    assert_eq!(remote_detail(b""), "empty body");
}

#[test]
fn echoed_secrets_are_scrubbed() {
    assert_eq!(
        crate::remote::http::remote_text_with(
            "bad value s3cr3t-value!",
            &["s3cr3t-value", ""],
            300
        ),
        "bad value [redacted]!"
    );
}
