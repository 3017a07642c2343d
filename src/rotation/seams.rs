//! The remotes a rotation talks to, as traits: [`FlowApi`] (Flow Service's
//! three calls) and [`TokenSource`] (the IMS token), with their production
//! implementations over [`FlowClient`] and [`ImsClient`]. The job in
//! `rotation` is written against these, so its tests script the peers on
//! paused time with no socket.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::remote::flow::{FlowClient, FlowError, RemoteConnection};
use crate::remote::ims::{AccessToken, ImsClient, ImsError};
use crate::remote::sts::AwsCredentials;

/// The Flow Service calls a rotation makes: [`FlowClient`] in production,
/// a scripted peer in this module's tests.
pub trait FlowApi: Send + Sync + std::fmt::Debug {
    /// `GET /connections/{id}`: the etag and the S3 parameters.
    fn get_connection<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
        token: &'a AccessToken,
    ) -> BoxFuture<'a, Result<RemoteConnection, FlowError>>;
    /// `PATCH /connections/{id}` with `If-Match`: the new etag, if answered.
    fn patch_credentials<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
        etag: &'a str,
        credentials: &'a AwsCredentials,
        token: &'a AccessToken,
    ) -> BoxFuture<'a, Result<Option<String>, FlowError>>;
    /// `GET /connections/{id}/test`: whether Flow Service reaches S3.
    fn test_connection<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
        token: &'a AccessToken,
    ) -> BoxFuture<'a, Result<bool, FlowError>>;
}

impl FlowApi for FlowClient {
    fn get_connection<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
        token: &'a AccessToken,
    ) -> BoxFuture<'a, Result<RemoteConnection, FlowError>> {
        Box::pin(FlowClient::get_connection(self, id, sandbox, token))
    }
    fn patch_credentials<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
        etag: &'a str,
        credentials: &'a AwsCredentials,
        token: &'a AccessToken,
    ) -> BoxFuture<'a, Result<Option<String>, FlowError>> {
        Box::pin(FlowClient::patch_credentials(
            self,
            id,
            sandbox,
            etag,
            credentials,
            token,
        ))
    }
    fn test_connection<'a>(
        &'a self,
        id: &'a str,
        sandbox: &'a str,
        token: &'a AccessToken,
    ) -> BoxFuture<'a, Result<bool, FlowError>> {
        Box::pin(FlowClient::test_connection(self, id, sandbox, token))
    }
}

/// Where a rotation gets its IMS token: [`ImsClient`] in production.
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// The current token (fetched when there is none or it is due).
    fn token(&self) -> BoxFuture<'_, Result<Arc<AccessToken>, ImsError>>;
    /// Drops `token` after Flow Service refused it (401).
    fn invalidate<'a>(&'a self, token: &'a AccessToken) -> BoxFuture<'a, ()>;
}

impl TokenSource for ImsClient {
    fn token(&self) -> BoxFuture<'_, Result<Arc<AccessToken>, ImsError>> {
        Box::pin(ImsClient::token(self))
    }
    fn invalidate<'a>(&'a self, token: &'a AccessToken) -> BoxFuture<'a, ()> {
        Box::pin(ImsClient::invalidate(self, token))
    }
}
