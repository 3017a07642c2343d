//! How a connection learns what it did not do itself: restored from the
//! state file after a restart ([`Event::Restored`]), adopted from the
//! leader's shared state ([`Event::Adopt`]), seeded with the etag and S3
//! target a listing brought ([`Event::Listed`]), and held until that
//! listing comes ([`Event::Hold`], [`Event::Release`]). Each is an event
//! through [`Connection::apply`], the one door.

use super::*;

impl Connection {
    /// A new connection remembered from the state file. When its
    /// credentials are still good for longer than `refresh_before` (and it
    /// is not `once`), the first job only checks that its etag is unchanged.
    /// A record with times this daemon could not have written is ignored
    /// (rotate now).
    pub(super) fn on_restored(
        &mut self,
        saved: &PersistedConnection,
        now: SystemTime,
        policy: &Policy,
    ) -> Action {
        let connection = self;
        let absurd = saved.expires_at > later(now, MAX_CREDENTIAL_LIFETIME)
            || saved
                .last_success_at
                .is_some_and(|at| at > later(now, RESTORE_SKEW));
        if absurd {
            tracing::warn!(
                connection = %connection.config.id,
                "state file record has impossible times; ignoring it, rotating now"
            );
            return connection.current_action();
        }
        connection.last_success = saved.last_success_at;
        if saved.sandbox != connection.config.sandbox || policy.once {
            return connection.current_action();
        }
        let expires_at = policy.believable_expiry(saved, now);
        connection.restored_expiry = Some(expires_at);
        if until(now, expires_at) > policy.refresh_before {
            connection.pushed = Some(Pushed {
                access_key_id: saved.access_key_id.clone(),
                expires_at,
            });
            connection.resume_etag = Some(saved.etag.clone());
            connection.etag = Some(saved.etag.clone());
        }
        connection.current_action()
    }

    /// Takes up the shared state another replica wrote (coordination: on
    /// becoming the leader, and for a standby's view). Of the shared record
    /// and what this replica knows itself, the credentials that expire
    /// later win; when they are good for longer than `refresh_before` the
    /// connection is scheduled from their expiry (no request: the next
    /// PATCH's `If-Match` catches any change meanwhile), otherwise it is due
    /// now. A record with impossible times, or from another sandbox, is
    /// ignored. A connection with a job in flight is left alone.
    pub(super) fn on_adopt(
        &mut self,
        shared: Option<&PersistedConnection>,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Action {
        if matches!(self.phase, Phase::InFlight | Phase::Finished) {
            return self.current_action();
        }
        let usable = shared.filter(|saved| {
            saved.sandbox == self.config.sandbox
                && saved.expires_at <= later(now, MAX_CREDENTIAL_LIFETIME)
                && saved
                    .last_success_at
                    .is_none_or(|at| at <= later(now, RESTORE_SKEW))
        });
        // A record whose etag differs from one listed after its rotation
        // describes a connection someone has changed since: not believed
        // (issue 26), so the connection rotates rather than trust it.
        // "After" with a margin: the record's time is rounded down to the
        // second and written by another host's clock, and a listing taken
        // while the leader was rotating may show the etag before its PATCH.
        let usable = usable.filter(|saved| match &self.listed_etag {
            Some((etag, seen_at))
                if *etag != saved.etag
                    && saved
                        .last_success_at
                        .is_none_or(|at| later(at, RESTORE_SKEW) < *seen_at) =>
            {
                let _span = self.span().entered();
                tracing::warn!("shared state's etag differs from the listed one; not adopting it");
                false
            }
            _ => true,
        });
        let believed = usable.map(|saved| policy.believable_expiry(saved, now));
        if let (Some(saved), Some(expires_at)) = (usable, believed)
            && self
                .pushed
                .as_ref()
                .is_none_or(|own| own.expires_at <= expires_at)
        {
            self.pushed = Some(Pushed {
                access_key_id: saved.access_key_id.clone(),
                expires_at,
            });
            self.etag = Some(saved.etag.clone());
            self.last_success = saved.last_success_at.or(self.last_success);
            self.resume_etag = None;
            self.failures_in_a_row = 0;
            self.last_error = None;
        }
        let fresh_until = self
            .pushed
            .as_ref()
            .map(|p| p.expires_at)
            .filter(|at| until(now, *at) > policy.refresh_before);
        let next = match fresh_until {
            Some(expires_at) => {
                self.had_outcome = true;
                self.next_rotation(now, expires_at, policy, draw)
            }
            None => now,
        };
        self.phase = Phase::Waiting(next);
        self.current_action()
    }

    /// What a list page said: the S3 target first, then the etag (which
    /// also ends a hold).
    pub(super) fn on_listed(
        &mut self,
        etag: Option<&str>,
        s3: Option<&crate::remote::s3probe::S3Target>,
        now: SystemTime,
        policy: &Policy,
        draw: f64,
    ) -> Action {
        if let Some(target) = s3 {
            self.seed_s3(target);
        }
        match etag {
            Some(etag) => {
                self.held = false;
                self.seed_etag(etag, now, policy, draw)
            }
            None => self.current_action(),
        }
    }

    /// An etag read in bulk (a list page) before the first job. A new
    /// connection saves its GET; after a restart, an etag equal to the one
    /// we left proves the connection unchanged without any request (it is
    /// then scheduled from its saved expiry), and a different one makes it
    /// rotate at once with the listed etag.
    fn seed_etag(&mut self, listed: &str, now: SystemTime, policy: &Policy, draw: f64) -> Action {
        self.listed_etag = Some((listed.to_owned(), now));
        if self.phase == Phase::InFlight {
            return Action::AwaitJob;
        }
        match self.resume_etag.take() {
            Some(left) if left == listed => {
                let expires_at = self.pushed.as_ref().map_or(now, |p| p.expires_at);
                let next = self.next_rotation(now, expires_at, policy, draw);
                let _span = self.span().entered();
                tracing::info!(
                    access_key_id = self.pushed.as_ref().map(|p| p.access_key_id.as_str()).unwrap_or(""),
                    expires_at = %rfc3339(expires_at),
                    next_rotation_at = %rfc3339(next),
                    "connection unchanged since restart, credentials kept"
                );
                self.had_outcome = true;
                self.phase = Phase::Waiting(next);
            }
            Some(_) => self.etag = Some(listed.to_owned()),
            None if self.etag.is_none() => self.etag = Some(listed.to_owned()),
            None => {}
        }
        self.current_action()
    }

    /// The S3 target (bucket, folder, endpoint) read in bulk from the same
    /// list item as the etag, before the first job: its pre-push check then
    /// needs no `GET`. A target learnt from a job is never overwritten, and a
    /// running job is left alone (its result carries what it read).
    fn seed_s3(&mut self, listed: &crate::remote::s3probe::S3Target) {
        if self.phase != Phase::InFlight && self.s3.is_none() {
            self.s3 = Some(listed.clone());
        }
    }
}
