//! One [`StsRequest`] per distinct STS identity, shared by every connection
//! (and every job) that asks for it: at 10,000 connections on one role the
//! daemon held 10,000 equal copies of the role, session name and tags, and
//! cloned one into every job.

use std::collections::HashSet;
use std::sync::Arc;

use crate::remote::sts::StsRequest;

/// The identities the daemon's connections use.
#[derive(Debug, Default)]
pub(super) struct Identities {
    known: HashSet<Arc<StsRequest>>,
}

impl Identities {
    /// The shared copy of `sts` (made the first time it is asked for).
    pub(super) fn intern(&mut self, sts: StsRequest) -> Arc<StsRequest> {
        if let Some(known) = self.known.get(&sts) {
            return Arc::clone(known);
        }
        let sts = Arc::new(sts);
        self.known.insert(Arc::clone(&sts));
        sts
    }

    /// Forgets the identities nothing else holds (after a reload) and
    /// answers the ones still in use: one copy each, however many
    /// connections share it.
    pub(super) fn prune(&mut self) -> HashSet<StsRequest> {
        self.known.retain(|sts| Arc::strong_count(sts) > 1);
        self.known.iter().map(|sts| (**sts).clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request(role: Option<&str>) -> StsRequest {
        StsRequest {
            role_arn: role.map(|r| crate::config::RoleArn::parse(r).unwrap()),
            external_id: None,
            session_name: "aep-s3-rotator".to_owned(),
            session_policy: None,
            policy_arns: Vec::new(),
            duration: Duration::from_secs(3600),
            attribution: Ok(crate::config::ExpandedAttribution::default()),
        }
    }

    #[test]
    fn equal_requests_share_one_copy_and_unused_ones_are_forgotten() {
        let mut identities = Identities::default();
        let role = "arn:aws:iam::123456789012:role/a";
        let a = identities.intern(request(Some(role)));
        let b = identities.intern(request(Some(role)));
        assert!(Arc::ptr_eq(&a, &b));
        let other = identities.intern(request(None));
        assert!(!Arc::ptr_eq(&a, &other));
        drop(other);
        let in_use = identities.prune();
        assert_eq!(identities.known.len(), 1);
        assert_eq!(
            in_use.into_iter().collect::<Vec<_>>(),
            [request(Some(role))]
        );
        drop((a, b));
        assert!(identities.prune().is_empty());
        assert!(identities.known.is_empty());
    }
}
