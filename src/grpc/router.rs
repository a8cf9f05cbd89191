//! The server's router: each request goes to the service its path names
//! (`/package.Service/Method`), found by comparing that first segment.
//!
//! tonic's `Routes` is an axum router, which boxes every response body twice
//! more (into axum's body and back into tonic's): every frame of every
//! response, each event on each watch stream above all, then goes through
//! those layers. This one hands RoomService's responses on as they are. A
//! path naming no service served here is UNIMPLEMENTED, as with tonic.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tower::ServiceExt as _;
use tower::util::{BoxCloneSyncService, Oneshot};

/// A service of the router other than the first, with its future boxed.
type Boxed = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

type Answered = Ready<Result<http::Response<Body>, Infallible>>;

/// `main` (RoomService, whose futures are not boxed again) and the others
/// (health, reflection). The server clones it for every request (hyper-util
/// calls a clone), so the others are shared, not cloned each time.
#[derive(Clone)]
pub struct Router<S> {
    main: S,
    others: Arc<[(&'static str, Boxed)]>,
}

impl<S: NamedService> Router<S> {
    pub fn new(main: S) -> Router<S> {
        Router {
            main,
            others: Arc::new([]),
        }
    }

    /// Serves `service` too, under its name.
    pub fn add_service<T>(mut self, service: T) -> Router<S>
    where
        T: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        T::Future: Send + 'static,
    {
        let mut others = self.others.to_vec();
        others.push((T::NAME, BoxCloneSyncService::new(service)));
        self.others = others.into();
        self
    }
}

/// The service name in a gRPC path: `a.B` in `/a.B/Method`.
fn service_name(path: &str) -> Option<&str> {
    path.strip_prefix('/')?
        .split_once('/')
        .map(|(name, _)| name)
}

impl<S> Service<http::Request<Body>> for Router<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Either<Oneshot<Boxed, http::Request<Body>>, Answered>>;

    /// Ready when `main` is; the others are readied on their calls.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.main.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let name = service_name(request.uri().path());
        if name == Some(S::NAME) {
            return Either::Left(self.main.call(request));
        }
        match self.others.iter().find(|(n, _)| Some(*n) == name) {
            Some((_, service)) => Either::Right(Either::Left(service.clone().oneshot(request))),
            None => {
                let status = Status::unimplemented(format!(
                    "this server does not serve {}",
                    request.uri().path()
                ));
                Either::Right(Either::Right(ready(Ok(status.into_http()))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    /// A service that answers with its name in `x-served-by`.
    #[derive(Clone)]
    struct Named<const FIRST: bool>;

    impl<const FIRST: bool> NamedService for Named<FIRST> {
        const NAME: &'static str = if FIRST { "test.First" } else { "test.Second" };
    }

    impl<const FIRST: bool> Service<http::Request<Body>> for Named<FIRST> {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Answered;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Answered {
            let mut response = http::Response::new(Body::empty());
            response
                .headers_mut()
                .insert("x-served-by", http::HeaderValue::from_static(Self::NAME));
            ready(Ok(response))
        }
    }

    async fn route(router: &Router<Named<true>>, path: &str) -> http::Response<Body> {
        let request = http::Request::builder()
            .uri(path)
            .body(Body::empty())
            .expect("a request");
        let Ok(response) = router.clone().oneshot(request).await;
        response
    }

    fn served_by(response: &http::Response<Body>) -> Option<&str> {
        response
            .headers()
            .get("x-served-by")
            .map(|v| v.to_str().expect("ASCII"))
    }

    #[tokio::test]
    async fn each_request_goes_to_the_service_its_path_names() {
        let router = Router::new(Named::<true>).add_service(Named::<false>);
        let first = route(&router, "/test.First/Get").await;
        assert_eq!(served_by(&first), Some("test.First"));
        let second = route(&router, "/test.Second/Get").await;
        assert_eq!(served_by(&second), Some("test.Second"));

        for unknown in ["/test.Third/Get", "/test.First", "/", "/test.Firs/Get"] {
            let refused = route(&router, unknown).await;
            assert_eq!(served_by(&refused), None, "{unknown}");
            let status = Status::from_header_map(refused.headers()).expect("a gRPC status");
            assert_eq!(status.code(), Code::Unimplemented, "{unknown}");
            assert!(status.message().contains(unknown), "{status:?}");
        }
    }
}
