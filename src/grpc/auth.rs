//! Bearer-token authentication on the gRPC port (`--auth-tokens FILE`).
//!
//! The file holds one token per line; `TOKEN readonly` allows reads and
//! watches only. Blank lines and lines starting with `#` are skipped. A
//! request carries `authorization: Bearer TOKEN`. Tokens are kept and
//! compared as SHA-256 digests in constant time, against every token, so the
//! time a check takes says nothing about how close a guess came. Health is
//! always open (load balancers probe it without credentials); every other
//! service, reflection included, needs a token.
//!
//! Nothing here logs a token, or what a request presented.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use futures::future::{Either, Ready};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::Status;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads and watches.
    ReadOnly,
    /// Everything.
    ReadWrite,
}

/// The tokens the server accepts.
#[derive(Clone)]
pub struct Tokens {
    digests: Arc<[([u8; 32], Access)]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.digests.len())
    }
}

/// The methods a read-only token may call: every other method of every
/// service is a write, so a method added later is refused until listed here.
const READ_METHODS: &[&str] = &[
    "/ivschat.rooms.v1.RoomService/GetRoom",
    "/ivschat.rooms.v1.RoomService/ListRooms",
    "/ivschat.rooms.v1.RoomService/WatchRooms",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

impl Tokens {
    /// Reads a token file. An unreadable file, a malformed line or a file
    /// without any token is an error (naming the line, never the token).
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read the token file {}", path.display()))?;
        Tokens::parse(&text).with_context(|| format!("in the token file {}", path.display()))
    }

    /// Parses a token file's text.
    pub fn parse(text: &str) -> anyhow::Result<Tokens> {
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default();
            let access = match (words.next(), words.next()) {
                (None, _) => Access::ReadWrite,
                (Some("readonly"), None) => Access::ReadOnly,
                _ => anyhow::bail!("line {}: expected TOKEN or TOKEN readonly", index + 1),
            };
            digests.push((digest(token), access));
        }
        anyhow::ensure!(
            !digests.is_empty(),
            "no tokens: every request would be refused"
        );
        Ok(Tokens {
            digests: digests.into(),
        })
    }

    /// What `token` allows, if it is one of ours. Compares with every token,
    /// each in constant time.
    pub fn check(&self, token: &str) -> Option<Access> {
        let presented = digest(token);
        let mut found = None;
        for (digest, access) in self.digests.iter() {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(*access);
            }
        }
        found
    }

    /// Whether a request for `path` (`/package.Service/Method`) with these
    /// `headers` may proceed; the status to answer with if not.
    fn admit(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("missing credentials: send authorization: Bearer TOKEN")
            })?;
        match self.check(token) {
            None => Err(Status::unauthenticated("unknown token")),
            Some(Access::ReadOnly) if !READ_METHODS.contains(&path) => Err(
                Status::permission_denied("this token allows reads and watches only"),
            ),
            Some(_) => Ok(()),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A gRPC service behind the token check (none when `tokens` is `None`).
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S> Authenticated<S> {
    pub fn new(inner: S, tokens: Option<Tokens>) -> Authenticated<S> {
        Authenticated { inner, tokens }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Self::Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && let Err(status) = tokens.admit(request.uri().path(), request.headers())
        {
            return Either::Left(futures::future::ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_access() {
        let tokens = Tokens::parse("# ops\nwriter\n\n  reader readonly  \n").unwrap();
        assert_eq!(tokens.check("writer"), Some(Access::ReadWrite));
        assert_eq!(tokens.check("reader"), Some(Access::ReadOnly));
        assert_eq!(tokens.check("readonly"), None);
        assert_eq!(tokens.check("write"), None);
        assert_eq!(tokens.check(""), None);
    }

    #[test]
    fn bad_files_name_the_line_not_the_token() {
        let error = Tokens::parse("good\nsecret123 admin\n").unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("secret123"), "{message}");
        assert!(Tokens::parse("# nothing\n\n").is_err());
        assert!(Tokens::parse("a readonly extra").is_err());
    }

    #[test]
    fn debug_never_shows_tokens() {
        let tokens = Tokens::parse("hunter2").unwrap();
        assert_eq!(format!("{tokens:?}"), "Tokens(1 redacted)");
    }

    #[test]
    fn read_only_tokens_reach_reads_only() {
        let tokens = Tokens::parse("w\nr readonly").unwrap();
        let mut headers = http::HeaderMap::new();
        let get = "/ivschat.rooms.v1.RoomService/GetRoom";
        let create = "/ivschat.rooms.v1.RoomService/CreateRoom";
        assert_eq!(
            tokens.admit(get, &headers).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        headers.insert(http::header::AUTHORIZATION, "Bearer r".parse().unwrap());
        assert!(tokens.admit(get, &headers).is_ok());
        assert_eq!(
            tokens.admit(create, &headers).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        headers.insert(http::header::AUTHORIZATION, "Bearer w".parse().unwrap());
        assert!(tokens.admit(create, &headers).is_ok());
        headers.insert(http::header::AUTHORIZATION, "Basic w".parse().unwrap());
        assert_eq!(
            tokens.admit(get, &headers).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
