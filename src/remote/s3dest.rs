//! Where the pre-push S3 check may send a connection's new credentials
//! (issue 26, docs/SECURITY.md).
//!
//! A connection's `serviceUrl` is set by whoever can edit the connection in
//! Experience Platform, and the check sends the new session token to it in
//! `x-amz-security-token`. So a `serviceUrl` is used only when it is:
//!
//! - an AWS S3 endpoint (`s3.<region>.amazonaws.com` and its variants) of
//!   the partition of the configured region (`amazonaws.com.cn` for `cn-`
//!   regions, `us-gov-` regions for GovCloud), over https; or
//! - at the origin (scheme, host, port) of one of the operator's own URLs:
//!   `[aws] s3_endpoint`, `AWS_ENDPOINT_URL_S3`, `[aws] s3_endpoints` (a VPC
//!   endpoint, an S3-compatible store); and loopback only there, or at the
//!   origin of another URL of the config that is itself loopback (the
//!   simulator, moto).
//!
//! Anything else fails the check without a request.

use url::Url;

/// The origins a `serviceUrl` may name besides AWS S3 endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// Origins of the operator's URLs.
    allowed: Vec<url::Origin>,
    /// The region whose partition AWS endpoints must be in.
    region: String,
}

impl Destinations {
    /// `endpoints`: the operator's S3 destinations (`s3_endpoint`, the
    /// environment's, `s3_endpoints`); `config_urls`: the config's other
    /// URLs, of which only loopback ones are allowed (where a test peer
    /// serves S3 beside STS).
    pub fn new<'a>(
        region: &str,
        endpoints: impl IntoIterator<Item = &'a Url>,
        config_urls: impl IntoIterator<Item = &'a Url>,
    ) -> Self {
        let mut allowed: Vec<url::Origin> = endpoints.into_iter().map(Url::origin).collect();
        allowed.extend(
            config_urls
                .into_iter()
                .filter(|url| crate::config::is_loopback(url))
                .map(Url::origin),
        );
        Self {
            allowed,
            region: region.to_owned(),
        }
    }

    /// Why the check must not send credentials to `url`, or `None` when it
    /// may.
    pub fn refusal(&self, url: &Url) -> Option<String> {
        if self.allowed.contains(&url.origin()) {
            return None;
        }
        if crate::config::is_loopback(url) {
            return Some(
                "it is a loopback address that is not the origin of a URL of the config".to_owned(),
            );
        }
        let host = url.host_str().unwrap_or_default();
        let aws = url.scheme() == "https"
            && region_of_host(host)
                .is_some_and(|region| partition_of(host, &region) == partition(&self.region));
        if aws {
            None
        } else {
            Some(format!(
                "it is not an AWS S3 endpoint of the {} partition; list it in [aws] s3_endpoints if it is yours",
                partition(&self.region)
            ))
        }
    }
}

/// The AWS partition of a region name.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The partition an S3 host is in: its region's, when its domain agrees
/// (China regions only under `amazonaws.com.cn`).
fn partition_of(host: &str, region: &str) -> &'static str {
    let china_domain = host
        .trim_end_matches('.')
        .to_ascii_lowercase()
        .ends_with(".amazonaws.com.cn");
    match (partition(region), china_domain) {
        ("aws-cn", true) => "aws-cn",
        (other, false) if other != "aws-cn" => other,
        _ => "none",
    }
}

/// A region name as AWS spells them (`eu-west-1`, `us-gov-west-1`).
pub(crate) fn valid_region(region: &str) -> bool {
    (4..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && region.contains('-')
}

/// The region in an S3 host name: `s3.eu-west-1.amazonaws.com`,
/// `s3-eu-west-1.amazonaws.com`, `s3.dualstack.eu-west-1.amazonaws.com`,
/// `bucket.s3.eu-west-1.amazonaws.com`; `s3.amazonaws.com` is us-east-1.
pub(crate) fn region_of_host(host: &str) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let rest = host
        .strip_suffix(".amazonaws.com")
        .or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
    let labels: Vec<&str> = rest.split('.').collect();
    let s3 = labels
        .iter()
        .rposition(|l| *l == "s3" || l.starts_with("s3-"))?;
    if let Some(region) = labels[s3].strip_prefix("s3-") {
        return valid_region(region).then(|| region.to_owned());
    }
    match labels.get(s3 + 1..).unwrap_or_default() {
        [] => Some("us-east-1".to_owned()),
        [region] | ["dualstack", region] if valid_region(region) => Some((*region).to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn only_aws_s3_of_the_partition_or_the_operators_origins_are_used() {
        let vpce = url("https://bucket.vpce-0abc-def.s3.eu-west-1.vpce.amazonaws.com");
        let minio = url("https://minio.internal.example:9000");
        let sts = url("http://127.0.0.1:4566");
        let platform = url("https://platform.adobe.io");
        let d = Destinations::new("eu-west-1", [&vpce, &minio], [&sts, &platform]);
        for ok in [
            "https://s3.eu-west-1.amazonaws.com",
            "https://s3.us-east-1.amazonaws.com/",
            "https://sales.s3.dualstack.ap-south-1.amazonaws.com",
            "https://minio.internal.example:9000/",
            "https://bucket.vpce-0abc-def.s3.eu-west-1.vpce.amazonaws.com",
            "http://127.0.0.1:4566",
        ] {
            assert_eq!(d.refusal(&url(ok)), None, "{ok}");
        }
        for bad in [
            "https://evil.example.com",
            "https://minio.internal.example:9001",
            "http://s3.eu-west-1.amazonaws.com",
            "https://s3.cn-north-1.amazonaws.com.cn",
            "https://s3.eu-west-1.amazonaws.com.evil.example",
            "http://127.0.0.1:9",
            "http://localhost:8080",
            "https://platform.adobe.io",
            "http://[::1]:4566",
        ] {
            assert!(d.refusal(&url(bad)).is_some(), "{bad}");
        }
        let china = Destinations::new("cn-north-1", [], []);
        assert_eq!(
            china.refusal(&url("https://s3.cn-north-1.amazonaws.com.cn")),
            None
        );
        assert!(
            china
                .refusal(&url("https://s3.eu-west-1.amazonaws.com"))
                .is_some()
        );
    }
}
