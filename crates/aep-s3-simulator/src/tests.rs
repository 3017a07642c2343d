//! Black-box tests: reqwest against the running simulator on `127.0.0.1:0`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::*;

const CLIENT_ID: &str = "test-client-id";
const CLIENT_SECRET: &str = "test-client-secret-7f3c9a";
const ORG_ID: &str = "5C1328435BF324E90A49402A@AdobeOrg";
const CONN: &str = "4cb0c374-d3bb-4557-b139-5712880adc55";
const OTHER: &str = "9d1e4a50-0000-4000-8000-000000000002";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/aep-s3-ingest";
const SIGV4: &str = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date, Signature=0123456789abcdef";

fn config(lifetime: Duration) -> SimConfig {
    let mut config = SimConfig::new(CLIENT_ID, CLIENT_SECRET, ORG_ID);
    config.connections = vec![
        SimConnection::s3(CONN, "prod", "sales-bucket"),
        SimConnection::s3(OTHER, "dev", "other"),
    ];
    config.credential_lifetime = lifetime;
    config.seed = Some(42);
    config
}

async fn start() -> Simulator {
    Simulator::start(config(Duration::from_secs(3600)))
        .await
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn ims_token(sim: &Simulator, http: &reqwest::Client) -> String {
    let response = http
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", "openid,AdobeID,read_organizations"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The text of the first `<name>...</name>` in `xml`.
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(&xml[start..end])
}

/// Parses `2026-11-23T14:41:00Z` (the inverse of `format_expiration`, by search).
fn parse_expiration(s: &str) -> SystemTime {
    // Days are found by comparing formatted midnights: slow but obviously right.
    let date = &s[..10];
    let mut day = 0u64;
    loop {
        let t = UNIX_EPOCH + Duration::from_secs(day * 86_400);
        if sts::format_expiration(t).starts_with(date) {
            break;
        }
        day += 1;
        assert!(day < 200_000, "no such date {s}");
    }
    let h: u64 = s[11..13].parse().unwrap();
    let m: u64 = s[14..16].parse().unwrap();
    let sec: u64 = s[17..19].parse().unwrap();
    assert!(s.ends_with('Z') && s.len() == 20, "{s}");
    UNIX_EPOCH + Duration::from_secs(day * 86_400 + h * 3600 + m * 60 + sec)
}

#[derive(Debug, Clone)]
struct Creds {
    access_key_id: String,
    secret: String,
    token: String,
    expiration: SystemTime,
}

async fn sts_call(
    sim: &Simulator,
    http: &reqwest::Client,
    form: &[(&str, &str)],
) -> (StatusCode, String) {
    let response = http
        .post(format!("{}/", sim.sts_url()))
        .header("authorization", SIGV4)
        .header("x-amz-date", "20260101T000000Z")
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

async fn assume_role(sim: &Simulator, http: &reqwest::Client) -> Creds {
    let (status, xml) = sts_call(
        sim,
        http,
        &[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", ROLE_ARN),
            ("RoleSessionName", "test-session"),
            ("DurationSeconds", "3600"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{xml}");
    Creds {
        access_key_id: tag(&xml, "AccessKeyId").unwrap().to_owned(),
        secret: tag(&xml, "SecretAccessKey").unwrap().to_owned(),
        token: tag(&xml, "SessionToken").unwrap().to_owned(),
        expiration: parse_expiration(tag(&xml, "Expiration").unwrap()),
    }
}

fn flow(
    sim: &Simulator,
    http: &reqwest::Client,
    method: Method,
    path: &str,
    token: &str,
    sandbox: &str,
) -> reqwest::RequestBuilder {
    flow_request(sim, http, method, path, token, CLIENT_ID, sandbox)
}

/// A Flow request with `api_key` as `x-api-key`, in `sandbox`.
fn flow_request(
    sim: &Simulator,
    http: &reqwest::Client,
    method: Method,
    path: &str,
    token: &str,
    api_key: &str,
    sandbox: &str,
) -> reqwest::RequestBuilder {
    http.request(
        method,
        format!("{}/data/foundation/flowservice{path}", sim.platform_url()),
    )
    .bearer_auth(token)
    .header("x-api-key", api_key)
    .header("x-gw-ims-org-id", ORG_ID)
    .header("x-sandbox-name", sandbox)
}

async fn get_connection(sim: &Simulator, http: &reqwest::Client, token: &str) -> Value {
    let response = flow(
        sim,
        http,
        Method::GET,
        &format!("/connections/{CONN}"),
        token,
        "prod",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn current_etag(sim: &Simulator, http: &reqwest::Client, token: &str) -> String {
    get_connection(sim, http, token).await["items"][0]["etag"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn three_ops(c: &Creds) -> Value {
    json!([
        {"op": "replace", "path": "/auth/params/s3AccessKey", "value": c.access_key_id},
        {"op": "replace", "path": "/auth/params/s3SecretKey", "value": c.secret},
        {"op": "replace", "path": "/auth/params/s3SessionToken", "value": c.token},
    ])
}

async fn patch(
    sim: &Simulator,
    http: &reqwest::Client,
    token: &str,
    if_match: Option<&str>,
    body: &Value,
) -> (StatusCode, Value) {
    let mut request = flow(
        sim,
        http,
        Method::PATCH,
        &format!("/connections/{CONN}"),
        token,
        "prod",
    )
    .header("content-type", "application/json")
    .body(body.to_string());
    if let Some(etag) = if_match {
        request = request.header("if-match", etag);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn ims_issues_tokens_for_the_right_secret_only() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    assert!(token.len() >= 100, "token should be long and opaque");

    let good: Value = http
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", "openid,AdobeID"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(good["token_type"], "bearer");
    assert_eq!(good["expires_in"], 86_400);
    assert_ne!(
        good["access_token"].as_str().unwrap(),
        token,
        "tokens are fresh"
    );

    let bad = http
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", "wrong"),
            ("scope", "openid"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(
        body["error_description"],
        "invalid client_id or client_secret parameter"
    );
    assert!(
        sim.violations().is_empty(),
        "a wrong secret is not a protocol violation"
    );
    assert_eq!(sim.stats().ims_tokens_issued, 2);
}

#[tokio::test]
async fn ims_secret_in_query_string_is_a_violation() {
    let sim = start().await;
    let response = http()
        .post(format!(
            "{}/ims/token/v3?client_secret={CLIENT_SECRET}",
            sim.ims_url()
        ))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", "openid"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let violations = sim.violations();
    assert_eq!(violations.len(), 1);
    assert!(violations[0].contains("query string"), "{violations:?}");
    assert!(
        !violations[0].contains(CLIENT_SECRET),
        "violations never hold secrets"
    );

    // Missing scope is a violation too.
    let response = http()
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_scope");
    assert_eq!(sim.stats().violations, 2);
}

#[tokio::test]
async fn flow_get_has_the_documented_shape() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let body = get_connection(&sim, &http, &token).await;
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(item["id"], CONN);
    assert_eq!(item["sandboxName"], "prod");
    assert_eq!(item["imsOrgId"], ORG_ID);
    assert_eq!(item["name"], "sales-bucket");
    assert_eq!(item["state"], "enabled");
    assert_eq!(item["connectionSpec"]["id"], S3_CONNECTION_SPEC_ID);
    assert_eq!(item["connectionSpec"]["version"], "1.0");
    assert_eq!(item["auth"]["specName"], "Access Key");
    assert!(
        item["createdAt"].as_u64().unwrap() > 1_600_000_000_000,
        "epoch ms"
    );
    assert!(item["updatedAt"].is_u64());
    let etag = item["etag"].as_str().unwrap();
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "{etag}"
    );
    assert_eq!(item["version"], item["etag"]);
    let params = &item["auth"]["params"];
    assert_eq!(params["s3SecretKey"], "***", "secrets are write-only");
    assert!(params["bucketName"].is_string());
    assert!(params["folderPath"].is_string());
    assert_eq!(sim.stats().flow_gets, 1);
    assert!(sim.violations().is_empty());
}

#[tokio::test]
async fn patch_with_etag_and_sts_credentials_succeeds() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;
    let before = sim.connection(CONN).unwrap();
    assert_eq!(before.access_key_id, None);
    assert_eq!(before.etag, etag);

    let (status, body) = patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], CONN);
    let new_etag = body["etag"].as_str().unwrap();
    assert_ne!(new_etag, etag);
    assert!(new_etag.starts_with('"') && new_etag.ends_with('"'));
    assert_eq!(current_etag(&sim, &http, &token).await, new_etag);

    let view = sim.connection(CONN).unwrap();
    assert_eq!(
        view.access_key_id.as_deref(),
        Some(creds.access_key_id.as_str())
    );
    assert_eq!(view.expires_at, Some(creds.expiration));
    assert_eq!(view.patches, 1);
    assert!(view.first_patch_at.is_some());
    assert_eq!(
        view.params_other_than_credentials,
        before.params_other_than_credentials
    );
    assert!(view.params_other_than_credentials["bucketName"].is_string());

    let test: Value = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}/test"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(test, json!({"result": true}));
    let other: Value = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{OTHER}/test"),
        &token,
        "dev",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(other, json!({"result": false}), "never rotated");

    assert!(sim.events().iter().any(|e| matches!(e,
        SimEvent::PatchApplied { connection, access_key_id, .. }
            if connection == CONN && *access_key_id == creds.access_key_id)));
    let stats = sim.stats();
    assert_eq!(stats.flow_patches_ok, 1);
    assert_eq!(stats.connections_never_rotated, 1);
    assert_eq!(stats.first_pass_done_unix_ms, None, "{OTHER} still waits");
    assert_eq!(stats.violations, 0, "{:?}", sim.violations());
    // Without the one never patched, the first pass ended with CONN's PATCH.
    sim.delete_connection(OTHER);
    let first_patch_ms = view
        .first_patch_at
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert_eq!(
        sim.stats().first_pass_done_unix_ms.map(u128::from),
        Some(first_patch_ms)
    );
}

#[tokio::test]
async fn stale_if_match_gets_412() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;
    sim.bump_etag(CONN);
    let (status, body) = patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        body["type"],
        "https://ns.adobe.com/aep/errors/FLOW-1412-412"
    );
    let detail = body["report"]["detailed-message"].as_str().unwrap();
    assert!(
        detail.contains(&format!("Supplied version=[{etag}]")),
        "{detail}"
    );
    assert!(detail.contains(CONN));
    assert_eq!(sim.connection(CONN).unwrap().patches, 0);
    assert_eq!(sim.stats().flow_412, 1);
    assert!(
        sim.violations().is_empty(),
        "a stale etag is not a violation"
    );
    assert!(
        sim.events()
            .iter()
            .any(|e| matches!(e, SimEvent::Conflict { connection, .. } if connection == CONN))
    );

    // The etag without its quotes is stale too.
    let etag = current_etag(&sim, &http, &token).await;
    let (status, _) = patch(
        &sim,
        &http,
        &token,
        Some(etag.trim_matches('"')),
        &three_ops(&creds),
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn missing_if_match_is_a_violation() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let (status, body) = patch(&sim, &http, &token, None, &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["status"], 400);
    let violations = sim.violations();
    assert_eq!(violations.len(), 1);
    assert!(violations[0].contains("If-Match"), "{violations:?}");
    assert_eq!(sim.connection(CONN).unwrap().patches, 0);
}

#[tokio::test]
async fn token_only_and_malformed_patches_are_violations() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;

    // Adobe's own example: the session token alone.
    let token_only =
        json!([{"op": "replace", "path": "/auth/params/s3SessionToken", "value": creds.token}]);
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &token_only).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        sim.violations()[0].contains("/auth/params/s3AccessKey is not set"),
        "{:?}",
        sim.violations()
    );

    // The OpenAPI spec's shape: one object, upper-case op.
    let object = json!({"op": "REPLACE", "path": "/auth/params", "value": {}});
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &object).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(sim.violations()[1].contains("object"));

    // Upper-case op in an array.
    let mut upper = three_ops(&creds);
    upper[0]["op"] = json!("Replace");
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &upper).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(sim.violations()[2].contains("\"Replace\""));

    // Replacing /auth/params whole drops bucketName.
    let whole = json!([{"op": "replace", "path": "/auth/params", "value": {
        "s3AccessKey": creds.access_key_id, "s3SecretKey": creds.secret, "s3SessionToken": creds.token}}]);
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &whole).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(sim.violations()[3].contains("\"/auth/params\""));

    // An extra path.
    let mut extra = three_ops(&creds);
    extra
        .as_array_mut()
        .unwrap()
        .push(json!({"op": "replace", "path": "/name", "value": "x"}));
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &extra).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    assert_eq!(sim.stats().violations, 5);
    assert_eq!(sim.connection(CONN).unwrap().patches, 0);
    for v in sim.violations() {
        assert!(
            !v.contains(&creds.secret) && !v.contains(&creds.token),
            "no secrets in {v}"
        );
    }
}

#[tokio::test]
async fn mixed_or_unknown_credentials_are_violations() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let a = assume_role(&sim, &http).await;
    let b = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;

    let mixed = Creds {
        secret: b.secret.clone(),
        ..a.clone()
    };
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&mixed)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let violations = sim.violations();
    assert!(
        violations[0].contains("mismatched credentials"),
        "{violations:?}"
    );
    assert!(violations[0].contains("secret key"));

    let made_up = Creds {
        access_key_id: "ASIAMADEUPMADEUP1234".to_owned(),
        ..a.clone()
    };
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&made_up)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(sim.violations()[1].contains("mismatched credentials"));
    assert_eq!(sim.connection(CONN).unwrap().patches, 0);

    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&b)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn expired_credentials_are_refused() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    sim.script(
        SimService::Sts,
        ScriptedFault::ShortCredentials(Duration::ZERO),
    );
    let creds = assume_role(&sim, &http).await;
    assert!(creds.expiration <= SystemTime::now());
    let etag = current_etag(&sim, &http, &token).await;
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        sim.violations()[0].contains("after they expired"),
        "{:?}",
        sim.violations()
    );
}

#[tokio::test]
async fn wrong_sandbox_and_deleted_connections_are_404() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let response = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "dev",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://ns.adobe.com/aep/errors/FLOW-1439-404"
    );
    assert_eq!(body["status"], 404);
    assert_eq!(
        body["report"]["detailed-message"],
        format!("Connection with id {CONN} not found in sandbox dev")
    );
    assert!(body["report"]["request-id"].is_string());

    sim.delete_connection(CONN);
    assert!(sim.connection(CONN).is_none());
    let response = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let creds = assume_role(&sim, &http).await;
    let (status, _) = patch(&sim, &http, &token, Some("\"x\""), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    sim.add_connection(SimConnection::s3(CONN, "prod", "back"));
    get_connection(&sim, &http, &token).await;
    assert!(sim.violations().is_empty());
}

#[tokio::test]
async fn trailing_slash_is_a_violation() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;
    let response = flow(
        &sim,
        &http,
        Method::PATCH,
        &format!("/connections/{CONN}/"),
        &token,
        "prod",
    )
    .header("content-type", "application/json")
    .header("if-match", &etag)
    .body(three_ops(&creds).to_string())
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(sim.violations()[0].contains("trailing slash"));
}

#[tokio::test]
async fn gateway_headers_are_enforced() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let url = format!(
        "{}/data/foundation/flowservice/connections/{CONN}",
        sim.platform_url()
    );

    let wrong_key = http
        .get(&url)
        .bearer_auth(&token)
        .header("x-api-key", "someone-else")
        .header("x-gw-ims-org-id", ORG_ID)
        .header("x-sandbox-name", "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_key.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        wrong_key.json::<Value>().await.unwrap()["error_code"],
        "403003"
    );
    assert_eq!(sim.stats().violations, 1);

    let wrong_org = http
        .get(&url)
        .bearer_auth(&token)
        .header("x-api-key", CLIENT_ID)
        .header("x-gw-ims-org-id", "OTHER@AdobeOrg")
        .header("x-sandbox-name", "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_org.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        wrong_org.json::<Value>().await.unwrap()["error_code"],
        "403027"
    );
    assert_eq!(sim.stats().violations, 1, "a wrong org is a config error");

    let no_sandbox = http
        .get(&url)
        .bearer_auth(&token)
        .header("x-api-key", CLIENT_ID)
        .header("x-gw-ims-org-id", ORG_ID)
        .send()
        .await
        .unwrap();
    assert_eq!(no_sandbox.status(), StatusCode::BAD_REQUEST);
    assert_eq!(sim.stats().violations, 2);

    let no_auth = http
        .get(&url)
        .header("x-api-key", CLIENT_ID)
        .header("x-gw-ims-org-id", ORG_ID)
        .header("x-sandbox-name", "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(sim.stats().violations, 3);

    // The client secret must never reach Flow Service.
    let leaky = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .header("x-debug", CLIENT_SECRET)
    .send()
    .await
    .unwrap();
    assert_eq!(leaky.status(), StatusCode::OK);
    assert!(sim.violations()[3].contains("client secret"));
}

#[tokio::test]
async fn revoked_tokens_get_401() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    get_connection(&sim, &http, &token).await;
    sim.revoke_tokens();
    let response = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error_code": "401013", "message": "Oauth token is not valid"})
    );
    assert_eq!(sim.stats().flow_401, 1);
    assert!(
        sim.violations().is_empty(),
        "a revoked token is not a violation"
    );

    let fresh = ims_token(&sim, &http).await;
    get_connection(&sim, &http, &fresh).await;

    let made_up = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        "eyJnotissued",
        "prod",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(made_up.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(sim.stats().violations, 1, "a token never issued is");
}

#[tokio::test]
async fn expired_ims_tokens_get_401() {
    let mut config = config(Duration::from_secs(3600));
    config.ims_token_lifetime = Duration::from_millis(300);
    let sim = Simulator::start(config).await.unwrap();
    let http = http();
    let token = ims_token(&sim, &http).await;
    get_connection(&sim, &http, &token).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let response = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn scripted_429_carries_retry_after_seconds_or_date() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    sim.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::Seconds(7)),
            body: None,
        },
    );
    sim.script(
        SimService::Flow,
        ScriptedFault::Status {
            status: 429,
            retry_after: Some(RetryAfter::HttpDate(Duration::from_secs(60))),
            body: None,
        },
    );
    let path = format!("/connections/{CONN}");
    let first = flow(&sim, &http, Method::GET, &path, &token, "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.headers()["retry-after"], "7");
    assert_eq!(first.json::<Value>().await.unwrap()["error_code"], "429001");

    let second = flow(&sim, &http, Method::GET, &path, &token, "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let date =
        httpdate::parse_http_date(second.headers()["retry-after"].to_str().unwrap()).unwrap();
    let ahead = date.duration_since(SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(55) && ahead <= Duration::from_secs(60),
        "{ahead:?}"
    );

    let third = flow(&sim, &http, Method::GET, &path, &token, "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::OK, "the script is used up");
    assert_eq!(sim.stats().flow_429, 2);
    assert_eq!(
        sim.events()
            .iter()
            .filter(|e| matches!(
                e,
                SimEvent::Throttled {
                    service: SimService::Flow,
                    ..
                }
            ))
            .count(),
        2
    );
}

#[tokio::test]
async fn scripts_for_a_connection_only_hit_that_connection() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    sim.script_for(
        OTHER,
        ScriptedFault::Status {
            status: 503,
            retry_after: None,
            body: None,
        },
    );
    get_connection(&sim, &http, &token).await;
    let other = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{OTHER}"),
        &token,
        "dev",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(other.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.stats().flow_5xx, 1);

    sim.script(
        SimService::Flow,
        ScriptedFault::Raw {
            status: 200,
            content_type: "application/json".to_owned(),
            body: "{\"items\": []}".to_owned(),
        },
    );
    let raw: Value = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(raw, json!({"items": []}));
}

#[tokio::test]
async fn scripted_reset_is_a_client_side_error() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    // Warm the pool, so the reset hits a kept-alive connection too.
    get_connection(&sim, &http, &token).await;
    sim.script(SimService::Flow, ScriptedFault::Reset);
    let result = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await;
    let error = result.expect_err("a reset must not look like an answer");
    assert!(!error.is_status() && !error.is_timeout(), "{error:?}");
    assert_eq!(sim.stats().flow_resets, 1);
    // The next request works.
    get_connection(&sim, &http, &token).await;

    sim.script(SimService::Ims, ScriptedFault::Reset);
    let ims = http
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await;
    assert!(ims.is_err());
}

#[tokio::test]
async fn random_faults_follow_the_rates() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let path = format!("/connections/{CONN}");
    sim.set_faults(Faults {
        flow_429: 1.0,
        retry_after_secs: Some(3),
        ..Faults::default()
    });
    let response = flow(&sim, &http, Method::GET, &path, &token, "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");

    sim.set_faults(Faults {
        flow_reset: 1.0,
        ..Faults::default()
    });
    assert!(
        flow(&sim, &http, Method::GET, &path, &token, "prod")
            .send()
            .await
            .is_err()
    );

    sim.set_faults(Faults {
        flow_5xx: 1.0,
        ..Faults::default()
    });
    let response = flow(&sim, &http, Method::GET, &path, &token, "prod")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_server_error());

    sim.set_faults(Faults {
        sts_throttle: 1.0,
        ..Faults::default()
    });
    let (status, xml) = sts_call(
        &sim,
        &http,
        &[("Action", "GetSessionToken"), ("Version", "2011-06-15")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(tag(&xml, "Code"), Some("Throttling"));

    sim.set_faults(Faults {
        flow_slow: 1.0,
        flow_slow_delay: Duration::from_millis(300),
        ..Faults::default()
    });
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let error = flow(&sim, &quick, Method::GET, &path, &token, "prod")
        .send()
        .await
        .unwrap_err();
    assert!(
        error.is_timeout(),
        "slow answers take twice the delay: {error:?}"
    );

    sim.set_faults(Faults::default());
    get_connection(&sim, &http, &token).await;
    let stats = sim.stats();
    assert_eq!(
        (stats.flow_429, stats.flow_resets, stats.flow_5xx),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn scripted_etag_churn_makes_the_next_patch_conflict() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    sim.script(SimService::Flow, ScriptedFault::EtagChurn);
    let etag = current_etag(&sim, &http, &token).await;
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let etag = current_etag(&sim, &http, &token).await;
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn scripted_delay_outlasts_a_client_timeout() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    sim.script(
        SimService::Flow,
        ScriptedFault::Delay(Duration::from_millis(600)),
    );
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = flow(
        &sim,
        &quick,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap_err();
    assert!(error.is_timeout());
}

#[tokio::test]
async fn service_down_refuses_and_recovers() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    get_connection(&sim, &http, &token).await;
    sim.set_service_down(SimService::Flow, true);
    // Both a kept-alive connection and a fresh client fail.
    let path = format!("/connections/{CONN}");
    assert!(
        flow(&sim, &http, Method::GET, &path, &token, "prod")
            .send()
            .await
            .is_err()
    );
    assert!(
        flow(
            &sim,
            &reqwest::Client::new(),
            Method::GET,
            &path,
            &token,
            "prod"
        )
        .send()
        .await
        .is_err()
    );
    sim.set_service_down(SimService::Flow, false);
    get_connection(&sim, &http, &token).await;

    sim.set_service_down(SimService::Sts, true);
    let sts = http.post(format!("{}/", sim.sts_url())).send().await;
    assert!(sts.is_err());
}

#[tokio::test]
async fn stop_closes_the_listeners() {
    let sim = start().await;
    let url = format!("{}/ims/token/v3", sim.ims_url());
    sim.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(reqwest::Client::new().post(&url).send().await.is_err());
}

#[tokio::test]
async fn sts_assume_role_answers_the_real_wire_format() {
    let lifetime = Duration::from_secs(1800);
    let sim = Simulator::start(config(lifetime)).await.unwrap();
    let http = http();
    let (status, xml) = sts_call(
        &sim,
        &http,
        &[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", ROLE_ARN),
            ("RoleSessionName", "aep-s3-rotator"),
            ("DurationSeconds", "900"),
            ("ExternalId", "ext-123"),
            ("Policy", "{\"Version\":\"2012-10-17\",\"Statement\":[]}"),
            (
                "PolicyArns.member.1.arn",
                "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
            ),
        ],
    )
    .await;
    let before = SystemTime::now();
    assert_eq!(status, StatusCode::OK, "{xml}");
    assert!(
        xml.starts_with("<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">")
    );
    assert!(xml.contains("<AssumeRoleResult>") && xml.contains("<Credentials>"));
    let akid = tag(&xml, "AccessKeyId").unwrap();
    assert!(akid.starts_with("ASIA") && akid.len() == 20);
    assert!(
        akid[4..]
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    );
    assert_eq!(tag(&xml, "SecretAccessKey").unwrap().len(), 40);
    assert!(tag(&xml, "SessionToken").unwrap().len() > 100);
    let expiration = tag(&xml, "Expiration").unwrap();
    let expires = parse_expiration(expiration);
    // now + lifetime, rounded down to the second: DurationSeconds=900 is ignored.
    let stated = expires.duration_since(before).unwrap_or_default();
    assert!(
        stated <= lifetime && stated > lifetime - Duration::from_secs(2),
        "{expiration}: {stated:?}"
    );
    assert!(tag(&xml, "AssumedRoleId").unwrap().starts_with("AROA"));
    assert!(
        tag(&xml, "AssumedRoleId")
            .unwrap()
            .ends_with(":aep-s3-rotator")
    );
    assert_eq!(
        tag(&xml, "Arn"),
        Some("arn:aws:sts::123456789012:assumed-role/aep-s3-ingest/aep-s3-rotator")
    );
    assert!(
        tag(&xml, "PackedPolicySize")
            .unwrap()
            .parse::<u32>()
            .unwrap()
            > 0
    );
    assert!(tag(&xml, "RequestId").unwrap().len() == 36);

    let (status, xml) = sts_call(
        &sim,
        &http,
        &[
            ("Action", "GetSessionToken"),
            ("Version", "2011-06-15"),
            ("DurationSeconds", "129600"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{xml}");
    assert!(xml.starts_with("<GetSessionTokenResponse"));
    assert!(xml.contains("<GetSessionTokenResult>"));
    assert!(!xml.contains("AssumedRoleUser"));
    assert!(tag(&xml, "AccessKeyId").unwrap().starts_with("ASIA"));

    let stats = sim.stats();
    assert_eq!((stats.sts_assume_role, stats.sts_get_session_token), (1, 1));
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn sts_validates_parameters_and_signature() {
    let sim = start().await;
    let http = http();
    let (status, xml) = sts_call(
        &sim,
        &http,
        &[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", "arn:aws:iam::12345:role/x"),
            ("RoleSessionName", "ok-name"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(xml.starts_with("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"));
    assert_eq!(tag(&xml, "Type"), Some("Sender"));
    assert_eq!(tag(&xml, "Code"), Some("ValidationError"));
    assert!(tag(&xml, "Message").unwrap().contains("roleArn"));
    assert!(tag(&xml, "RequestId").is_some());
    assert_eq!(sim.stats().violations, 1);

    let (status, xml) = sts_call(
        &sim,
        &http,
        &[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", ROLE_ARN),
            ("RoleSessionName", "x"),
            ("DurationSeconds", "60"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = tag(&xml, "Message").unwrap();
    assert!(message.starts_with("2 validation errors"), "{message}");

    let unsigned = http
        .post(format!("{}/", sim.sts_url()))
        .form(&[("Action", "GetSessionToken"), ("Version", "2011-06-15")])
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        tag(&unsigned.text().await.unwrap(), "Code"),
        Some("MissingAuthenticationToken")
    );
    assert_eq!(sim.stats().violations, 3);

    sim.script(
        SimService::Sts,
        ScriptedFault::StsError {
            code: "AccessDenied".to_owned(),
            message: "not allowed".to_owned(),
            status: 403,
        },
    );
    let (status, xml) = sts_call(
        &sim,
        &http,
        &[("Action", "GetSessionToken"), ("Version", "2011-06-15")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(tag(&xml, "Code"), Some("AccessDenied"));
    assert_eq!(tag(&xml, "Message"), Some("not allowed"));
}

#[tokio::test]
async fn short_credentials_expire_when_stated() {
    let sim = start().await;
    let http = http();
    sim.script(
        SimService::Sts,
        ScriptedFault::ShortCredentials(Duration::from_secs(5)),
    );
    let before = SystemTime::now();
    let short = assume_role(&sim, &http).await;
    let stated = short.expiration.duration_since(before).unwrap_or_default();
    assert!(
        stated <= Duration::from_secs(5) && stated > Duration::from_secs(3),
        "{stated:?}"
    );
    let normal = assume_role(&sim, &http).await;
    assert!(normal.expiration > before + Duration::from_secs(3000));
}

/// Waits until the wall clock is early in its second, so credentials of a
/// 1 s lifetime (rounded down to the second) live at least half a second.
async fn early_in_second() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    if nanos > 400_000_000 {
        tokio::time::sleep(Duration::from_nanos(
            u64::from(1_000_000_000 - nanos) + 5_000_000,
        ))
        .await;
    }
}

#[tokio::test]
async fn expired_seconds_are_accounted_from_the_first_patch() {
    let sim = Simulator::start(config(Duration::from_secs(1)))
        .await
        .unwrap();
    let http = http();
    let token = ims_token(&sim, &http).await;
    assert_eq!(sim.stats().expired_seconds, 0.0);

    early_in_second().await;
    let a = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;
    let (status, body) = patch(&sim, &http, &token, Some(&etag), &three_ops(&a)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sim.stats().expired_seconds, 0.0, "fresh credentials");

    // Let A run 300 ms past its expiry.
    let wait = a
        .expiration
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(300)).await;
    let overrun = sim.stats().expired_seconds;
    assert!((0.25..0.6).contains(&overrun), "{overrun}");

    early_in_second().await;
    let b = assume_role(&sim, &http).await;
    let etag = body["etag"].as_str().unwrap().to_owned();
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&b)).await;
    assert_eq!(status, StatusCode::OK);
    let patched_at = SystemTime::now();
    let gap = patched_at
        .duration_since(a.expiration)
        .unwrap()
        .as_secs_f64();
    let stats = sim.stats();
    assert!(
        (stats.expired_seconds - gap).abs() < 0.1,
        "{} vs {gap}",
        stats.expired_seconds
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        (sim.stats().expired_seconds - stats.expired_seconds).abs() < 1e-9,
        "no growth while the stored credentials are fresh"
    );
    assert_eq!(stats.connections_never_rotated, 1);
    assert_eq!(stats.flow_patches_ok, 2);
}

#[tokio::test]
async fn issued_secrets_hold_every_secret_and_debug_hides_them() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let secrets = sim.issued_secrets();
    for expected in [CLIENT_SECRET, &token, &creds.secret, &creds.token] {
        assert!(secrets.iter().any(|s| s == expected), "missing a secret");
    }
    assert!(
        !secrets.contains(&creds.access_key_id),
        "the access key id is not secret"
    );

    let etag = current_etag(&sim, &http, &token).await;
    patch(&sim, &http, &token, Some(&etag), &three_ops(&creds)).await;
    let get = get_connection(&sim, &http, &token).await.to_string();
    for secret in &secrets {
        assert!(!get.contains(secret.as_str()), "GET leaks a secret");
    }
    let debug = format!("{sim:?} {:?}", config(Duration::from_secs(1)));
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
    for event in sim.events() {
        let event = format!("{event:?}");
        assert!(
            secrets.iter().all(|s| !event.contains(s.as_str())),
            "{event}"
        );
    }
}

#[tokio::test]
async fn stats_endpoint_and_in_flight_peak() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    sim.set_faults(Faults {
        latency: Duration::from_millis(200),
        ..Faults::default()
    });
    let requests = (0..8).map(|_| get_connection(&sim, &http, &token));
    futures::future::join_all(requests).await;
    let stats: SimStats = http
        .get(format!("{}/_sim/stats", sim.platform_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.flow_gets, 8);
    assert_eq!(stats.flow_requests, 8, "/_sim/stats is not counted");
    assert_eq!(stats.max_in_flight, 8);
    assert_eq!(stats.connections_never_rotated, 2);
}

#[test]
fn expiration_format_matches_known_dates() {
    let at = |secs: u64| sts::format_expiration(UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_795_445_999), "2026-11-23T14:59:59Z");
    // Agrees with httpdate's independent calendar on a spread of instants.
    for secs in (0..4_000_000_000u64).step_by(7_777_777) {
        let t = UNIX_EPOCH + Duration::from_secs(secs);
        let http = httpdate::fmt_http_date(t); // "Sun, 06 Nov 1994 08:49:37 GMT"
        let ours = sts::format_expiration(t);
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = months.iter().position(|m| *m == &http[8..11]).unwrap() + 1;
        let expected = format!(
            "{}-{month:02}-{}T{}Z",
            &http[12..16],
            &http[5..7],
            &http[17..25]
        );
        assert_eq!(ours, expected);
        // Sub-second parts are rounded down.
        assert_eq!(sts::format_expiration(t + Duration::from_millis(999)), ours);
    }
}

#[test]
fn handles_can_be_shared_across_tasks() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Simulator>();
    shareable::<SimConfig>();
    shareable::<SimEvent>();
}

/// `GET /connections?QUERY` in `sandbox`: status and body.
async fn list(
    sim: &Simulator,
    http: &reqwest::Client,
    token: &str,
    sandbox: &str,
    query: &str,
) -> (StatusCode, Value) {
    let response = flow(
        sim,
        http,
        Method::GET,
        &format!("/connections?{query}"),
        token,
        sandbox,
    )
    .send()
    .await
    .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn listed_ids(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The `continuationToken` of a page's next link.
fn next_token(body: &Value) -> Option<String> {
    let href = body["_links"]["next"]["href"].as_str()?;
    assert!(
        href.starts_with("/connections?continuationToken="),
        "{href}"
    );
    Some(href.split_once('=').unwrap().1.to_owned())
}

#[tokio::test]
async fn list_filters_pages_and_orders_as_documented() {
    let mut config = config(Duration::from_secs(3600));
    for n in 0..5 {
        config.connections.push(
            SimConnection::s3(format!("s3-{n}"), "prod", format!("ingest-{n}"))
                .with_description(if n % 2 == 0 { "rotate:aep-s3" } else { "" }),
        );
    }
    let mut other = SimConnection::s3("blob", "prod", "blob");
    other.connection_spec_id = "other-spec".to_owned();
    config.connections.push(other);
    let sim = Simulator::start(config).await.unwrap();
    let http = http();
    let token = ims_token(&sim, &http).await;
    let s3 = format!("property=connectionSpec.id%3D%3D{S3_CONNECTION_SPEC_ID}");

    // Per sandbox; the spec filter drops the non-S3 one.
    let (status, body) = list(&sim, &http, &token, "prod", &s3).await;
    assert_eq!(status, StatusCode::OK);
    let mut ids = listed_ids(&body);
    ids.sort();
    assert_eq!(ids, [CONN, "s3-0", "s3-1", "s3-2", "s3-3", "s3-4"]);
    assert!(body["items"][0]["etag"].as_str().unwrap().starts_with('"'));
    let (_, dev) = list(&sim, &http, &token, "dev", &s3).await;
    assert_eq!(listed_ids(&dev), [OTHER]);

    // Comma = any of; several property= are ANDed; nested paths.
    let (_, body) = list(&sim, &http, &token, "prod", "property=id%3D%3Ds3-0,s3-1,blob&property=auth.specName%3D%3DAccess%20Key&property=description%3D%3Drotate:aep-s3").await;
    assert_eq!(listed_ids(&body), ["s3-0"]);
    let (_, body) = list(
        &sim,
        &http,
        &token,
        "prod",
        "property=id!%3Ds3-0,blob&orderby=-name",
    )
    .await;
    // "sales-bucket" > "s3-4": names sort as strings.
    assert_eq!(listed_ids(&body), [CONN, "s3-4", "s3-3", "s3-2", "s3-1"]);

    // Pages: the filters are sent again with the token, and nothing is lost
    // or repeated even when a connection is added between pages.
    let mut seen = Vec::new();
    let mut query = format!("{s3}&limit=2&orderby=name");
    let mut pages = 0;
    loop {
        let (status, body) = list(&sim, &http, &token, "prod", &query).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["items"].as_array().unwrap().len() <= 2);
        seen.extend(listed_ids(&body));
        pages += 1;
        if pages == 1 {
            sim.add_connection(SimConnection::s3("a-first", "prod", "a-first"));
        }
        match next_token(&body) {
            Some(next) => query = format!("{s3}&limit=2&orderby=name&continuationToken={next}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["s3-0", "s3-1", "s3-2", "s3-3", "s3-4", CONN]);
    assert_eq!(sim.stats().flow_lists, 2 + 2 + 3);
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

/// The default simulator plus `n` S3 connections `s3-0`.. in `prod`, a
/// client and an IMS token.
async fn with_prod_connections(n: usize) -> (Simulator, reqwest::Client, String) {
    let mut config = config(Duration::from_secs(3600));
    for n in 0..n {
        config.connections.push(SimConnection::s3(
            format!("s3-{n}"),
            "prod",
            format!("ingest-{n}"),
        ));
    }
    let sim = Simulator::start(config).await.unwrap();
    let http = http();
    let token = ims_token(&sim, &http).await;
    (sim, http, token)
}

/// Pages in creation order, both ways: newest first is the default (oldest
/// first) order reversed, `count=true` counts the whole match on every
/// page, and a connection created between pages comes last.
#[tokio::test]
async fn pages_in_creation_order_both_ways_and_count_the_whole_match() {
    let (sim, http, token) = with_prod_connections(4).await;
    let (_, all) = list(&sim, &http, &token, "prod", "limit=1000").await;
    let mut oldest_first = listed_ids(&all);
    assert_eq!(oldest_first.len(), 5, "{all}");
    assert!(all.get("count").is_none(), "count only when asked: {all}");

    // Newest first, with and without a count (two ways through the
    // simulator); oldest first by default, with a connection created
    // between two pages showing up last.
    let pages = |base: &'static str, add_after_first: bool| {
        let (sim, http, token) = (&sim, &http, &token);
        async move {
            let (mut query, mut seen) = (base.to_owned(), Vec::new());
            loop {
                let (status, body) = list(sim, http, token, "prod", &query).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                if base.contains("count=true") {
                    assert_eq!(body["count"], 5, "{body}");
                }
                if add_after_first && seen.is_empty() {
                    sim.add_connection(SimConnection::s3("s3-new", "prod", "new"));
                }
                seen.extend(listed_ids(&body));
                match next_token(&body) {
                    Some(next) => query = format!("{base}&continuationToken={next}"),
                    None => return seen,
                }
            }
        }
    };
    let mut newest_first = oldest_first.clone();
    newest_first.reverse();
    assert_eq!(
        pages("orderby=-createdAt&limit=2&count=true", false).await,
        newest_first
    );
    assert_eq!(
        pages("orderby=-createdAt&limit=2", false).await,
        newest_first
    );
    oldest_first.push("s3-new".to_owned());
    assert_eq!(pages("limit=2", true).await, oldest_first);

    // The same token under another order is another query's.
    let base = "orderby=-createdAt&limit=2&count=true";
    let (_, first) = list(&sim, &http, &token, "prod", base).await;
    let next = next_token(&first).unwrap();
    let (status, _) = list(
        &sim,
        &http,
        &token,
        "prod",
        &format!("orderby=-name&limit=2&count=true&continuationToken={next}"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(sim.stats().violations, 1);
}

/// An `id==` filter is answered by looking the ids up (not by scanning the
/// sandbox): it still names ids *in the sandbox asked*, and each once.
#[tokio::test]
async fn an_id_filter_answers_the_sandboxs_connections_each_once() {
    let (sim, http, token) = with_prod_connections(3).await;
    // Another sandbox's id, an unknown one and a repeated one add nothing.
    let query = format!("property=id%3D%3Ds3-2,{OTHER},nope,s3-0,s3-2&orderby=name");
    let (status, body) = list(&sim, &http, &token, "prod", &query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(listed_ids(&body), ["s3-0", "s3-2"]);
    let (_, dev) = list(&sim, &http, &token, "dev", &query).await;
    assert_eq!(listed_ids(&dev), [OTHER]);
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn list_refuses_what_adobe_does_not_document() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    for query in [
        "property=name",
        "property=name%3Dx",
        "filter=name%3D%3Dx",
        "limit=0",
        "limit=ten",
        "orderby=updatedAt",
        "continuationToken=zz",
    ] {
        let (status, body) = list(&sim, &http, &token, "prod", query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["report"]["detailed-message"].is_string(), "{body}");
    }
    assert_eq!(sim.stats().violations, 7);

    // A token must come back with the query it belongs to.
    sim.add_connection(SimConnection::s3("second", "prod", "second"));
    let (_, body) = list(&sim, &http, &token, "prod", "limit=1").await;
    let next = next_token(&body).unwrap();
    let (status, _) = list(
        &sim,
        &http,
        &token,
        "prod",
        &format!("limit=1&property=state%3D%3Denabled&continuationToken={next}"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = list(
        &sim,
        &http,
        &token,
        "dev",
        &format!("limit=1&continuationToken={next}"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = list(
        &sim,
        &http,
        &token,
        "prod",
        &format!("limit=1&continuationToken={next}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // The gateway headers are required as for every call.
    let response = http
        .get(format!(
            "{}/data/foundation/flowservice/connections",
            sim.platform_url()
        ))
        .bearer_auth(&token)
        .header("x-gw-ims-org-id", ORG_ID)
        .header("x-sandbox-name", "prod")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn knobs_rename_retag_disable_and_delete_while_listing() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let before = current_etag(&sim, &http, &token).await;
    assert!(sim.rename_connection(CONN, "renamed"));
    assert!(sim.set_description(CONN, "rotate:aep-s3"));
    assert!(sim.set_state(CONN, "disabled"));
    assert!(!sim.rename_connection("nope", "x"));
    let (_, body) = list(
        &sim,
        &http,
        &token,
        "prod",
        "property=id%3D%3D4cb0c374-d3bb-4557-b139-5712880adc55",
    )
    .await;
    let item = &body["items"][0];
    assert_eq!(item["name"], "renamed");
    assert_eq!(item["description"], "rotate:aep-s3");
    assert_eq!(item["state"], "disabled");
    assert!(item["createdAt"].is_u64());
    assert_ne!(
        item["etag"].as_str().unwrap(),
        before,
        "an edit is a new version"
    );
    let (_, body) = list(&sim, &http, &token, "prod", "property=state%3D%3Denabled").await;
    assert!(listed_ids(&body).is_empty());
    sim.delete_connection(CONN);
    let (_, body) = list(&sim, &http, &token, "prod", "").await;
    assert!(listed_ids(&body).is_empty());

    // A scripted list fault hits list requests only.
    sim.script_list(ScriptedFault::Status {
        status: 503,
        retry_after: None,
        body: None,
    });
    let (status, _) = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{OTHER}"),
        &token,
        "dev",
    )
    .send()
    .await
    .map(|r| (r.status(), ()))
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, _) = list(&sim, &http, &token, "dev", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn hostile_fault_modes_answer_as_documented() {
    let sim = start().await;
    let trap = SecretTrap::start().await.unwrap();
    // reqwest's default client follows redirects: the trap must then see it.
    let follows = http();
    sim.script(
        SimService::Ims,
        ScriptedFault::Redirect {
            location: format!("{}/ims/token/v3", trap.url()),
        },
    );
    let answer = follows
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[("client_secret", CLIENT_SECRET)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK, "the trap answered");
    assert!(trap.received_any(&[CLIENT_SECRET.to_owned()]));

    // Echo: the client secret comes back in error_description.
    sim.script(SimService::Ims, ScriptedFault::EchoSecrets);
    let answer = follows
        .post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[("client_secret", CLIENT_SECRET)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(answer.text().await.unwrap().contains(CLIENT_SECRET));

    // Partial STS answer: no SecretAccessKey, the rest intact.
    sim.script(
        SimService::Sts,
        ScriptedFault::PartialCredentials {
            omit_secret: true,
            omit_token: false,
        },
    );
    let (status, xml) = sts_call(
        &sim,
        &follows,
        &[
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", ROLE_ARN),
            ("RoleSessionName", "test-session"),
            ("DurationSeconds", "3600"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(tag(&xml, "SecretAccessKey").is_none(), "{xml}");
    assert!(tag(&xml, "SessionToken").is_some(), "{xml}");

    // Invalid etag on the next GET only.
    let token = ims_token(&sim, &follows).await;
    sim.script_for(CONN, ScriptedFault::InvalidEtag);
    let item = get_connection(&sim, &follows, &token).await;
    let etag = item["items"][0]["etag"].as_str().unwrap().to_owned();
    assert!(
        reqwest::header::HeaderValue::from_str(&etag).is_err(),
        "{etag:?}"
    );
    let item = get_connection(&sim, &follows, &token).await;
    let etag = item["items"][0]["etag"].as_str().unwrap().to_owned();
    assert!(
        reqwest::header::HeaderValue::from_str(&etag).is_ok(),
        "{etag:?}"
    );

    // Endless body: more than any cap, until the client stops reading.
    sim.script(SimService::Flow, ScriptedFault::EndlessBody);
    let mut answer = flow(
        &sim,
        &follows,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap();
    let mut read = 0usize;
    while read <= 4 << 20 {
        read += answer
            .chunk()
            .await
            .unwrap()
            .expect("the body goes on")
            .len();
    }
    drop(answer);

    // Hostile text: control characters in the detail, padded to length.
    sim.script(SimService::Flow, ScriptedFault::HostileText { len: 10_000 });
    let answer = flow(
        &sim,
        &follows,
        Method::GET,
        &format!("/connections/{CONN}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap();
    let body: Value = answer.json().await.unwrap();
    let detail = body["report"]["detailed-message"].as_str().unwrap();
    assert!(detail.contains('\u{1b}') && detail.contains('\n') && detail.len() >= 10_000);
    // None of this is a violation: the client did nothing wrong.
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

fn create_body(c: &Creds, bucket: &str) -> Value {
    json!({
        "name": "new-s3", "description": "rotate:aep-s3",
        "auth": {"specName": "Access Key", "params": {
            "s3AccessKey": c.access_key_id, "s3SecretKey": c.secret, "s3SessionToken": c.token,
            "bucketName": bucket, "folderPath": "in/"}},
        "connectionSpec": {"id": S3_CONNECTION_SPEC_ID, "version": "1.0"}
    })
}

async fn create(
    sim: &Simulator,
    http: &reqwest::Client,
    token: &str,
    body: &Value,
) -> (StatusCode, Option<String>, Value) {
    let response = flow(sim, http, Method::POST, "/connections", token, "prod")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        location,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn post_creates_a_connection_that_is_readable_patchable_and_listable() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    let (status, location, body) =
        create(&sim, &http, &token, &create_body(&creds, "my-bucket-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let etag = body["etag"].as_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(
        location.as_deref(),
        Some(format!("/data/foundation/flowservice/connections/{id}").as_str())
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    // Readable, with the secrets masked and the parameters as given.
    let item: Value = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{id}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let item = &item["items"][0];
    assert_eq!(item["etag"], etag.as_str());
    assert_eq!(item["name"], "new-s3");
    assert_eq!(item["description"], "rotate:aep-s3");
    assert_eq!(item["state"], "enabled");
    assert_eq!(item["auth"]["params"]["bucketName"], "my-bucket-1");
    assert_eq!(item["auth"]["params"]["folderPath"], "in/");
    assert_eq!(item["auth"]["params"]["s3SecretKey"], "***");
    assert!(!item.to_string().contains(&creds.secret));
    // Not visible from another sandbox.
    let other = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{id}"),
        &token,
        "dev",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    // The stored credentials work (test endpoint).
    let test: Value = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{id}/test"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(test, json!({"result": true}));
    // Listable.
    let list: Value = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections?property=id=={id}"),
        &token,
        "prod",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["id"], id.as_str());
    // Patchable with its etag.
    let fresh = assume_role(&sim, &http).await;
    let response = flow(
        &sim,
        &http,
        Method::PATCH,
        &format!("/connections/{id}"),
        &token,
        "prod",
    )
    .header("content-type", "application/json")
    .header("if-match", &etag)
    .body(three_ops(&fresh).to_string())
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let view = sim.connection(&id).unwrap();
    assert_eq!(view.patches, 1);
    assert_eq!(
        view.access_key_id.as_deref(),
        Some(fresh.access_key_id.as_str())
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn post_refuses_what_an_s3_access_key_connection_does_not_allow() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let creds = assume_role(&sim, &http).await;
    // Bucket names: Adobe's rules; a value problem, not a protocol violation.
    for bucket in [
        "ab",
        "My-Bucket",
        "-bucket",
        "bucket-",
        "192.168.1.10",
        "a_b_c",
        &"b".repeat(64),
    ] {
        let (status, _, body) = create(&sim, &http, &token, &create_body(&creds, bucket)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bucket}: {body}");
        assert_eq!(body["status"], 400, "{body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .starts_with("https://ns.adobe.com/aep/errors/")
        );
        let detail = body["report"]["detailed-message"].as_str().unwrap();
        assert!(detail.contains("bucketName"), "{detail}");
    }
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    let mut cases: Vec<(&str, Value)> = Vec::new();
    let mut v = create_body(&creds, "good-bucket");
    v["connectionSpec"]["id"] = json!("00000000-0000-0000-0000-000000000000");
    cases.push(("connectionSpec.id", v));
    let mut v = create_body(&creds, "good-bucket");
    v["connectionSpec"]["version"] = json!("2.0");
    cases.push(("connectionSpec.version", v));
    let mut v = create_body(&creds, "good-bucket");
    v["auth"]["specName"] = json!("IAMRole Based");
    cases.push(("auth.specName", v));
    let mut v = create_body(&creds, "good-bucket");
    v["auth"]["params"]["roleArn"] = json!("arn:aws:iam::123456789012:role/x");
    cases.push(("auth.params.roleArn", v));
    let mut v = create_body(&creds, "good-bucket");
    v["auth"]["params"]
        .as_object_mut()
        .unwrap()
        .remove("s3SessionToken");
    cases.push(("s3SessionToken", v));
    let mut v = create_body(&creds, "good-bucket");
    v["name"] = json!("");
    cases.push(("name", v));
    let mut v = create_body(&creds, "good-bucket");
    v["auth"]["params"]["s3SecretKey"] = json!("not-the-issued-secret-key");
    cases.push(("not issued together", v));
    let mut v = create_body(&creds, "good-bucket");
    v["auth"]["params"]["s3AccessKey"] = json!("ASIANEVERISSUED00001");
    cases.push(("was not issued by STS", v));
    for (what, body) in &cases {
        let (status, _, answer) = create(&sim, &http, &token, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        let violations = sim.violations();
        assert!(
            violations.last().is_some_and(|v| v.contains(what)),
            "{what}: {violations:?}"
        );
    }
    // Headers: no content type, then no sandbox.
    let response = flow(&sim, &http, Method::POST, "/connections", &token, "prod")
        .body(create_body(&creds, "good-bucket").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let response = http
        .post(format!(
            "{}/data/foundation/flowservice/connections",
            sim.platform_url()
        ))
        .bearer_auth(&token)
        .header("x-api-key", CLIENT_ID)
        .header("x-gw-ims-org-id", ORG_ID)
        .header("content-type", "application/json")
        .body(create_body(&creds, "good-bucket").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(sim.violations().last().unwrap().contains("x-sandbox-name"));
    // Nothing was created by any of these.
    assert!(
        !sim.events()
            .iter()
            .any(|e| matches!(e, SimEvent::ConnectionAdded { .. })),
        "a refused POST created a connection"
    );
}

/// A Flow request in sandbox `prod` with `api_key` as `x-api-key`.
fn flow_as(
    sim: &Simulator,
    http: &reqwest::Client,
    method: Method,
    path: &str,
    token: &str,
    api_key: &str,
) -> reqwest::RequestBuilder {
    flow_request(sim, http, method, path, token, api_key, "prod")
}

/// A token for `client_id`/`secret` (one of the extra clients).
async fn ims_token_for(
    sim: &Simulator,
    http: &reqwest::Client,
    client_id: &str,
    secret: &str,
) -> reqwest::Response {
    http.post(format!("{}/ims/token/v3", sim.ims_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", "openid,AdobeID,read_organizations"),
        ])
        .send()
        .await
        .unwrap()
}

async fn token_of(response: reqwest::Response) -> String {
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn extra_clients_get_tokens_bound_to_their_own_client_id() {
    let mut cfg = config(Duration::from_secs(3600));
    cfg.extra_clients = vec![
        ("replica-1".to_owned(), "replica-1-secret-abcdef".to_owned()),
        ("replica-2".to_owned(), "replica-2-secret-abcdef".to_owned()),
    ];
    let debug = format!("{cfg:?}");
    assert!(debug.contains("replica-1"), "{debug}");
    assert!(!debug.contains("replica-1-secret"), "{debug}");
    let sim = Simulator::start(cfg).await.unwrap();
    let http = http();

    // Each secret works for its own id only.
    let wrong = ims_token_for(&sim, &http, "replica-1", "replica-2-secret-abcdef").await;
    assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
    let t1 =
        token_of(ims_token_for(&sim, &http, "replica-1", "replica-1-secret-abcdef").await).await;

    // The token is bound to replica-1: another client's id (even the primary
    // one) as x-api-key is a violation, its own is fine.
    let primary_key = flow(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &t1,
        "prod",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(primary_key.status(), StatusCode::FORBIDDEN);
    assert_eq!(sim.violations().len(), 1, "{:?}", sim.violations());
    assert!(sim.violations()[0].contains("x-api-key is not the client id the token was issued to"));
    let own_key = flow_as(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &t1,
        "replica-1",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(own_key.status(), StatusCode::OK);

    // Every client secret is a secret the leak checks look for.
    let secrets = sim.issued_secrets();
    for s in [
        CLIENT_SECRET,
        "replica-1-secret-abcdef",
        "replica-2-secret-abcdef",
    ] {
        assert!(secrets.iter().any(|x| x == s), "{s} missing");
    }
    // And one sent to Flow Service is a violation, like the primary's.
    let leaked = flow_as(
        &sim,
        &http,
        Method::GET,
        &format!("/connections/{CONN}"),
        &t1,
        "replica-1",
    )
    .header("x-debug", "replica-2-secret-abcdef")
    .send()
    .await
    .unwrap();
    assert_eq!(leaked.status(), StatusCode::OK);
    assert!(
        sim.violations()
            .iter()
            .any(|v| v.contains("the IMS client secret was sent to Flow Service")),
        "{:?}",
        sim.violations()
    );
}

/// A PATCH of `CONN` by `client_id` with its token.
async fn patch_as(
    sim: &Simulator,
    http: &reqwest::Client,
    client_id: &str,
    token: &str,
    if_match: &str,
    body: &Value,
) -> StatusCode {
    flow_as(
        sim,
        http,
        Method::PATCH,
        &format!("/connections/{CONN}"),
        token,
        client_id,
    )
    .header("content-type", "application/json")
    .header("if-match", if_match)
    .body(body.to_string())
    .send()
    .await
    .unwrap()
    .status()
}

#[tokio::test]
async fn patch_log_records_who_wrote_and_counts_refusals_per_client() {
    let mut cfg = config(Duration::from_secs(3600));
    cfg.extra_clients = vec![("replica-1".to_owned(), "replica-1-secret-abcdef".to_owned())];
    let sim = Simulator::start(cfg).await.unwrap();
    let http = http();
    let primary = ims_token(&sim, &http).await;
    let replica =
        token_of(ims_token_for(&sim, &http, "replica-1", "replica-1-secret-abcdef").await).await;
    assert!(sim.patches().accepted.is_empty());

    let first = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &primary).await;
    let status = patch_as(&sim, &http, CLIENT_ID, &primary, &etag, &three_ops(&first)).await;
    assert_eq!(status, StatusCode::OK);

    // replica-1 still holds the old etag: 412, counted against it.
    let second = assume_role(&sim, &http).await;
    let status = patch_as(
        &sim,
        &http,
        "replica-1",
        &replica,
        &etag,
        &three_ops(&second),
    )
    .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    // A scripted reset of its next PATCH counts as "reset".
    sim.script_for(CONN, ScriptedFault::Reset);
    let reset = flow_as(
        &sim,
        &http,
        Method::PATCH,
        &format!("/connections/{CONN}"),
        &replica,
        "replica-1",
    )
    .header("content-type", "application/json")
    .header("if-match", &etag)
    .body(three_ops(&second).to_string())
    .send()
    .await;
    assert!(reset.is_err(), "a reset has no answer");
    // A GET is not a PATCH: never counted.
    let fresh = current_etag(&sim, &http, &primary).await;
    let status = patch_as(
        &sim,
        &http,
        "replica-1",
        &replica,
        &fresh,
        &three_ops(&second),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A token the simulator never issued: counted under "?".
    let status = patch_as(
        &sim,
        &http,
        "replica-1",
        "eyJforged",
        &fresh,
        &three_ops(&second),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let patches = sim.patches();
    let who: Vec<(u64, &str, &str)> = patches
        .accepted
        .iter()
        .map(|p| (p.seq, p.client_id.as_str(), p.access_key_id.as_str()))
        .collect();
    assert_eq!(
        who,
        [
            (1, CLIENT_ID, first.access_key_id.as_str()),
            (2, "replica-1", second.access_key_id.as_str())
        ]
    );
    assert!(patches.accepted.iter().all(|p| p.connection == CONN));
    assert!(patches.accepted[0].at_unix_ms <= patches.accepted[1].at_unix_ms);
    assert_eq!(patches.dropped, 0);
    assert_eq!(
        patches.writers(),
        ["replica-1".to_owned(), CLIENT_ID.to_owned()],
        "sorted by id"
    );
    assert_eq!(patches.by_client("replica-1").len(), 1);
    assert_eq!(patches.on_connection(CONN).len(), 2);
    assert_eq!(patches.rejected_count("replica-1", "412"), 1);
    assert_eq!(patches.rejected_count("replica-1", "reset"), 1);
    assert_eq!(patches.rejected_count("?", "401"), 1);
    assert_eq!(patches.rejected_count(CLIENT_ID, "412"), 0);
    assert_eq!(
        patches
            .rejected
            .values()
            .flat_map(|m| m.values())
            .sum::<u64>(),
        3
    );

    // The same over HTTP, for scripts.
    let over_http: SimPatches = http
        .get(format!("{}/_sim/patches", sim.platform_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, patches);
    assert!(
        sim.violations().iter().all(|v| v.contains("never issued")),
        "{:?}",
        sim.violations()
    );
}

/// `GET /connections/{CONN}/test` → its `result`.
async fn connection_test(sim: &Simulator, http: &reqwest::Client, token: &str) -> bool {
    let answer: Value = flow(
        sim,
        http,
        Method::GET,
        &format!("/connections/{CONN}/test"),
        token,
        "prod",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    answer["result"].as_bool().unwrap()
}

#[tokio::test]
async fn revoked_sessions_fail_the_connection_test_and_new_ones_do_not() {
    let sim = start().await;
    let http = http();
    let token = ims_token(&sim, &http).await;
    let old = assume_role(&sim, &http).await;
    let etag = current_etag(&sim, &http, &token).await;
    let (status, body) = patch(&sim, &http, &token, Some(&etag), &three_ops(&old)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(connection_test(&sim, &http, &token).await);
    assert!(!sim.sts_session(&old.access_key_id).unwrap().revoked);

    // Another role's revocation changes nothing here.
    sim.revoke_sessions("arn:aws:iam::123456789012:role/other");
    assert!(connection_test(&sim, &http, &token).await);

    let revoked_at = sim.revoke_sessions(ROLE_ARN);
    let session = sim.sts_session(&old.access_key_id).unwrap();
    assert!(session.revoked && session.issued_at < revoked_at);
    assert!(!connection_test(&sim, &http, &token).await);
    assert!(
        sim.events().iter().any(
            |e| matches!(e, SimEvent::SessionsRevoked { role_arn, .. } if role_arn == ROLE_ARN)
        )
    );

    // A PATCH that stores the revoked credentials is accepted (Flow
    // Service stores anything) and counted.
    let etag = current_etag(&sim, &http, &token).await;
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&old)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.stats().flow_patches_revoked, 1);

    // A session issued after the revocation works.
    let new = assume_role(&sim, &http).await;
    let session = sim.sts_session(&new.access_key_id).unwrap();
    assert!(!session.revoked && session.issued_at >= revoked_at);
    let etag = current_etag(&sim, &http, &token).await;
    let (status, _) = patch(&sim, &http, &token, Some(&etag), &three_ops(&new)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(connection_test(&sim, &http, &token).await);
    assert_eq!(sim.stats().flow_patches_revoked, 1);
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[tokio::test]
async fn sts_records_session_tags_and_source_identity_and_checks_their_limits() {
    let sim = start().await;
    let http = http();
    let base = [
        ("Action", "AssumeRole"),
        ("Version", "2011-06-15"),
        ("RoleArn", ROLE_ARN),
        ("RoleSessionName", "aep-s3-rotator"),
    ];
    let mut form = base.to_vec();
    form.extend([
        ("Tags.member.1.Key", "connection"),
        ("Tags.member.1.Value", CONN),
        ("Tags.member.2.Key", "team name"),
        ("Tags.member.2.Value", "Daten und Ströme"),
        ("SourceIdentity", "aep-prod"),
    ]);
    let (status, xml) = sts_call(&sim, &http, &form).await;
    assert_eq!(status, StatusCode::OK, "{xml}");
    let key = tag(&xml, "AccessKeyId").unwrap();
    let session = sim.sts_session(key).unwrap();
    assert_eq!(session.role_arn.as_deref(), Some(ROLE_ARN));
    assert_eq!(session.session_name, "aep-s3-rotator");
    assert_eq!(
        session.session_tags,
        [
            ("connection".to_owned(), CONN.to_owned()),
            ("team name".to_owned(), "Daten und Ströme".to_owned())
        ]
    );
    assert_eq!(session.source_identity.as_deref(), Some("aep-prod"));
    assert!(sim.events().iter().any(|e| matches!(
        e,
        SimEvent::StsIssued { source_identity: Some(s), session_tags, .. }
            if s == "aep-prod" && session_tags.len() == 2
    )));
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    let too_long = "v".repeat(257);
    for (extra, needle) in [
        (
            vec![
                ("Tags.member.1.Key", "aws:team"),
                ("Tags.member.1.Value", "x"),
            ],
            "tags.key",
        ),
        (
            vec![
                ("Tags.member.1.Key", "team"),
                ("Tags.member.1.Value", "a;b"),
            ],
            "tags.value",
        ),
        (
            vec![
                ("Tags.member.1.Key", "team"),
                ("Tags.member.1.Value", too_long.as_str()),
            ],
            "tags.value",
        ),
        (
            vec![
                ("Tags.member.1.Key", "Team"),
                ("Tags.member.1.Value", "a"),
                ("Tags.member.2.Key", "team"),
                ("Tags.member.2.Value", "b"),
            ],
            "Duplicate tag keys",
        ),
        (
            vec![("Tags.member.1.Key", "team")],
            "lacks its Key or its Value",
        ),
        (vec![("SourceIdentity", "a b")], "sourceIdentity"),
        (vec![("SourceIdentity", "x")], "sourceIdentity"),
    ] {
        let mut form = base.to_vec();
        form.extend(extra.iter().copied());
        let (status, xml) = sts_call(&sim, &http, &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra:?}: {xml}");
        assert_eq!(tag(&xml, "Code"), Some("ValidationError"), "{xml}");
        assert!(xml.contains(needle), "{extra:?}: {xml}");
    }
    let mut form = base.to_vec();
    let pairs: Vec<(String, String)> = (1..=51)
        .flat_map(|n| {
            [
                (format!("Tags.member.{n}.Key"), format!("k{n}")),
                (format!("Tags.member.{n}.Value"), "v".to_owned()),
            ]
        })
        .collect();
    form.extend(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let (status, xml) = sts_call(&sim, &http, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{xml}");
    assert!(xml.contains("less than or equal to 50"), "{xml}");
}
