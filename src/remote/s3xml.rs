//! The two S3 XML documents the pre-push check reads, parsed rather than
//! searched (issue 26): a `200` proves access only when its root element is
//! `ListBucketResult` naming the bucket asked for (a proxy's page that merely
//! contains `<ListBucketResult` proves nothing), and an error is read from
//! the `Error` root's own children only.
//!
//! Uses the SDK's XML reader (`aws-smithy-xml`). What is read is remote
//! text: the caller scrubs it of secrets, then bounds and escapes it.

use aws_smithy_xml::decode::{Document, try_data};

/// The `<Name>` of a `ListBucketResult` document, or `None` when `body` is
/// not one (another root, not XML, no name).
pub fn listed_bucket(body: &str) -> Option<String> {
    let mut doc = Document::new(body);
    let mut root = doc.root_element().ok()?;
    if !root.start_el().matches("ListBucketResult") {
        return None;
    }
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("Name") {
            return try_data(&mut tag).ok().map(|name| name.into_owned());
        }
    }
    None
}

/// The children of an S3 `<Error>` document that are used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorDoc {
    /// `<Code>`, when it is a plausible S3 error code (letters, digits and
    /// dots, at most 64): anything else is not reflected.
    pub code: Option<String>,
    /// `<Message>`, raw: scrub before showing.
    pub message: Option<String>,
    /// `<Region>` of a redirect.
    pub region: Option<String>,
    /// `<Endpoint>` of a redirect.
    pub endpoint: Option<String>,
}

/// Reads an `<Error>` document; anything else (another root, not XML, a
/// HEAD's empty body) is an empty [`ErrorDoc`].
pub fn error_doc(body: &str) -> ErrorDoc {
    let mut out = ErrorDoc::default();
    let mut doc = Document::new(body);
    let Ok(mut root) = doc.root_element() else {
        return out;
    };
    if !root.start_el().matches("Error") {
        return out;
    }
    while let Some(mut tag) = root.next_tag() {
        let slot = if tag.start_el().matches("Code") {
            &mut out.code
        } else if tag.start_el().matches("Message") {
            &mut out.message
        } else if tag.start_el().matches("Region") {
            &mut out.region
        } else if tag.start_el().matches("Endpoint") {
            &mut out.endpoint
        } else {
            continue;
        };
        if slot.is_none()
            && let Ok(text) = try_data(&mut tag)
        {
            *slot = Some(text.trim().to_owned());
        }
    }
    out.code = out.code.filter(|code| {
        (1..=64).contains(&code.len())
            && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_list_bucket_result_root_naming_the_bucket_counts() {
        let real = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>sales</Name><Prefix>in/</Prefix><KeyCount>0</KeyCount></ListBucketResult>"#;
        assert_eq!(listed_bucket(real).as_deref(), Some("sales"));
        for fake in [
            "<html><body>see <ListBucketResult> docs</body></html>",
            "<!-- <ListBucketResult><Name>sales</Name></ListBucketResult> --><html/>",
            "ok <ListBucketResult",
            "",
            "<Error><Name>sales</Name></Error>",
        ] {
            assert_eq!(listed_bucket(fake), None, "{fake}");
        }
    }

    #[test]
    fn error_documents_are_read_from_their_own_children() {
        let doc = error_doc(
            "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>m &amp; m</Message><Region>eu-west-1</Region></Error>",
        );
        assert_eq!(doc.code.as_deref(), Some("AccessDenied"));
        assert_eq!(doc.message.as_deref(), Some("m & m"));
        assert_eq!(doc.region.as_deref(), Some("eu-west-1"));
        let odd = error_doc("<Error><Code>Access Denied\u{1b}[2J</Code></Error>");
        assert_eq!(odd.code, None, "a code that is not a word is not reflected");
        assert_eq!(
            error_doc("<html><Code>AccessDenied</Code></html>"),
            ErrorDoc::default()
        );
    }
}
