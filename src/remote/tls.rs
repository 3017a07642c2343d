//! The CA roots every HTTPS client of the daemon trusts (IMS, Flow Service,
//! STS and the AWS credential chain's own endpoints), decided once per process.
//!
//! Both HTTP clients are given the same explicit set instead of loading the
//! host's store themselves: reqwest's platform verifier refuses to build at
//! all when the host has none (`No CA certificates were loaded from the
//! system`), and the AWS SDK's client would start and then fail every
//! handshake. The rule:
//!
//! 1. `SSL_CERT_FILE` / `SSL_CERT_DIR` set: the operator named the trust
//!    store, so only that is used; if it yields no usable certificate the
//!    daemon refuses to start (exit 78) and says which variable to fix. A
//!    typo there must not silently widen trust to a public set.
//! 2. Otherwise the host's store (the usual OpenSSL locations, e.g.
//!    `/etc/ssl/certs/ca-certificates.crt`).
//! 3. A host with no store at all (a `scratch` image, a minimal VM) gets the
//!    Mozilla roots compiled into this binary (`webpki-root-certs`), with a
//!    warning: the three endpoints the daemon talks to are public and carry
//!    publicly trusted certificates, so this is what `ca-certificates` would
//!    have installed, frozen at build time. Installing the host's
//!    `ca-certificates` package (or setting `SSL_CERT_FILE`) takes over again.
//!
//! The roots are read once: a changed store takes effect at the next start.

use std::fmt;
use std::sync::OnceLock;

use rustls_pki_types::CertificateDer;

/// `SSL_CERT_FILE`: one PEM bundle (OpenSSL's variable, honoured by
/// `rustls-native-certs`).
const CERT_FILE: &str = "SSL_CERT_FILE";
/// `SSL_CERT_DIR`: directories of PEM files, `:`-separated.
const CERT_DIR: &str = "SSL_CERT_DIR";

/// Where the trusted roots came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`, as set (e.g. `SSL_CERT_FILE=/x.pem`).
    Environment(String),
    /// The host's CA store at the usual OpenSSL locations.
    System,
    /// The Mozilla roots compiled into the binary; `reason` says why the host
    /// store was not used.
    Builtin {
        /// Why: what was looked at and found empty.
        reason: String,
    },
}

/// The trusted roots and where they came from.
#[derive(Clone)]
pub struct Roots {
    source: CaSource,
    certs: Vec<CertificateDer<'static>>,
    /// Certificates in the store that are not usable trust anchors, skipped.
    skipped: usize,
}

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Roots")
            .field("source", &self.source)
            .field("certs", &self.certs.len())
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// The operator named a trust store that holds no usable certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no CA certificates: {setting} holds no usable certificate ({detail}); point it at a PEM bundle of CA certificates, or unset it to use the host's store"
)]
pub struct RootsError {
    /// The variable(s) as set, e.g. `SSL_CERT_FILE=/etc/ssl/none.pem`.
    pub setting: String,
    /// What went wrong reading it.
    pub detail: String,
}

impl Roots {
    /// Where the roots came from.
    pub fn source(&self) -> &CaSource {
        &self.source
    }

    /// How many roots are trusted.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// True when nothing is trusted (never for a value [`roots`] returns).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// One line for logs and `check`, e.g. `143 roots from the system store`.
    pub fn describe(&self) -> String {
        let skipped = match self.skipped {
            0 => String::new(),
            n => format!(" ({n} unusable certificates skipped)"),
        };
        match &self.source {
            CaSource::Environment(setting) => {
                format!("{} roots from {setting}{skipped}", self.certs.len())
            }
            CaSource::System => {
                format!("{} roots from the system store{skipped}", self.certs.len())
            }
            CaSource::Builtin { reason } => format!(
                "{} Mozilla roots built into this binary (webpki-root-certs): {reason}; install the host's ca-certificates package or set SSL_CERT_FILE to use your own",
                self.certs.len()
            ),
        }
    }
}

/// The roots for this process, read on first use.
pub fn roots() -> Result<&'static Roots, &'static RootsError> {
    static ROOTS: OnceLock<Result<Roots, RootsError>> = OnceLock::new();
    ROOTS.get_or_init(load).as_ref()
}

fn load() -> Result<Roots, RootsError> {
    let setting = env_setting();
    let loaded = rustls_native_certs::load_native_certs();
    let errors = loaded.errors.iter().map(|e| e.to_string()).collect();
    choose(setting, loaded.certs, errors)
}

/// `SSL_CERT_FILE=…` and/or `SSL_CERT_DIR=…` as set, or `None`. An empty
/// value counts as unset, as `rustls-native-certs` treats an empty directory
/// list.
fn env_setting() -> Option<String> {
    let parts: Vec<String> = [CERT_FILE, CERT_DIR]
        .into_iter()
        .filter_map(|name| {
            let value = std::env::var_os(name)?;
            (!value.is_empty()).then(|| format!("{name}={}", value.to_string_lossy()))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The rule in the module docs, on what was loaded: `setting` is the
/// environment override if any, `certs`/`errors` what reading the store gave.
fn choose(
    setting: Option<String>,
    certs: Vec<CertificateDer<'static>>,
    errors: Vec<String>,
) -> Result<Roots, RootsError> {
    let total = certs.len();
    let usable: Vec<CertificateDer<'static>> =
        certs.into_iter().filter(|cert| usable(cert)).collect();
    let skipped = total - usable.len();
    let detail = || {
        if errors.is_empty() {
            match total {
                0 => "no certificate found".to_owned(),
                n => format!("{n} certificates, none usable as a root"),
            }
        } else {
            errors.join("; ")
        }
    };
    match setting {
        Some(setting) if usable.is_empty() => Err(RootsError {
            setting,
            detail: detail(),
        }),
        Some(setting) => Ok(Roots {
            source: CaSource::Environment(setting),
            certs: usable,
            skipped,
        }),
        None if usable.is_empty() => Ok(Roots {
            source: CaSource::Builtin {
                reason: format!("the host has no CA store ({})", detail()),
            },
            certs: webpki_root_certs::TLS_SERVER_ROOT_CERTS.to_vec(),
            skipped: 0,
        }),
        None => Ok(Roots {
            source: CaSource::System,
            certs: usable,
            skipped,
        }),
    }
}

/// A certificate rustls can use as a trust anchor. Checked here because the
/// AWS SDK's client panics on one it cannot parse.
fn usable(cert: &CertificateDer<'_>) -> bool {
    webpki::anchor_from_trusted_cert(cert).is_ok()
}

/// The roots for reqwest (`ClientBuilder::tls_certs_only`). Empty, so that
/// nothing is trusted, when [`roots`] refused: callers start only after
/// [`roots`] succeeded, and a client must fail closed, never open.
pub fn reqwest_roots() -> Vec<reqwest::Certificate> {
    let Ok(roots) = roots() else {
        return Vec::new();
    };
    roots
        .certs
        .iter()
        .filter_map(|cert| reqwest::Certificate::from_der(cert).ok())
        .collect()
}

/// The AWS SDK's HTTPS client (hyper 1, rustls with aws-lc-rs, as the SDK's
/// default) trusting exactly [`roots`]; trusting nothing when they were
/// refused (fail closed, as [`reqwest_roots`]).
pub fn aws_http_client() -> aws_sdk_sts::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    let mut store = tls::TrustStore::empty().with_native_roots(false);
    if let Ok(roots) = roots() {
        for cert in &roots.certs {
            store.add_pem_certificate(pem(cert));
        }
    }
    let provider = tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc);
    match tls::TlsContext::builder().with_trust_store(store).build() {
        Ok(context) => aws_smithy_http_client::Builder::new()
            .tls_provider(provider)
            .tls_context(context)
            .build_https(),
        // `build` cannot fail today (it only stores the trust store). Should
        // it ever, a plain-HTTP client fails every HTTPS call: closed, not
        // open to the SDK's default trust.
        Err(error) => {
            tracing::error!(error = %error, "cannot build the AWS HTTPS client");
            aws_smithy_http_client::Builder::new().build_http()
        }
    }
}

/// One certificate as PEM, the form the SDK's trust store takes.
fn pem(cert: &CertificateDer<'_>) -> Vec<u8> {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn mozilla() -> Vec<CertificateDer<'static>> {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS.to_vec()
    }

    #[test]
    fn a_host_without_a_store_gets_the_builtin_roots() {
        let roots = choose(None, Vec::new(), Vec::new()).unwrap();
        assert!(matches!(roots.source(), CaSource::Builtin { .. }));
        assert_eq!(roots.len(), webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        assert!(roots.len() > 100, "the Mozilla set has well over 100 roots");
        let line = roots.describe();
        assert!(
            line.contains("Mozilla roots built into this binary"),
            "{line}"
        );
        assert!(line.contains("the host has no CA store"), "{line}");
        assert!(line.contains("ca-certificates"), "{line}");
    }

    #[test]
    fn the_system_store_is_used_when_it_has_roots() {
        let mut certs = mozilla();
        certs.truncate(5);
        let roots = choose(None, certs, Vec::new()).unwrap();
        assert_eq!(roots.source(), &CaSource::System);
        assert_eq!(roots.describe(), "5 roots from the system store");
    }

    #[test]
    fn an_operator_store_without_certificates_is_refused_not_widened() {
        let error = choose(
            Some("SSL_CERT_FILE=/etc/none.pem".to_owned()),
            Vec::new(),
            vec!["could not load certs from file /etc/none.pem: No such file".to_owned()],
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("SSL_CERT_FILE=/etc/none.pem"), "{text}");
        assert!(text.contains("No such file"), "{text}");
        assert!(text.contains("point it at a PEM bundle"), "{text}");
        let empty = choose(
            Some("SSL_CERT_DIR=/empty".to_owned()),
            Vec::new(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(
            empty.to_string().contains("no certificate found"),
            "{empty}"
        );
    }

    #[test]
    fn unparsable_certificates_are_skipped_and_counted() {
        let mut certs = mozilla();
        certs.truncate(3);
        certs.push(CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]));
        let roots = choose(Some("SSL_CERT_FILE=/x.pem".to_owned()), certs, Vec::new()).unwrap();
        assert_eq!(roots.len(), 3);
        assert_eq!(
            roots.describe(),
            "3 roots from SSL_CERT_FILE=/x.pem (1 unusable certificates skipped)"
        );
        // Only garbage: refused, and the reason says so.
        let garbage = vec![CertificateDer::from(vec![0x30, 0x00])];
        let error =
            choose(Some("SSL_CERT_FILE=/x.pem".to_owned()), garbage, Vec::new()).unwrap_err();
        assert!(
            error.to_string().contains("1 certificates, none usable"),
            "{error}"
        );
    }

    #[test]
    fn pem_round_trips_every_builtin_root() {
        for cert in mozilla() {
            let text = pem(&cert);
            let back = CertificateDer::from_pem_slice(&text).unwrap();
            assert_eq!(back.as_ref(), cert.as_ref());
        }
    }
}
