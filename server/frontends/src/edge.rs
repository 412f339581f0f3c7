//! What every request passes on its way in, whatever the door: a panic anywhere in a
//! handler is caught and answered as INTERNAL (gRPC) or 500 (HTTP), never as OK or a
//! dropped connection; a gRPC message tonic cannot decode (a path that is not UTF-8) is
//! the client's error, INVALID_ARGUMENT, not INTERNAL.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use sluice_core::error::Error;

/// The gRPC edge as a tower layer for tonic's server.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcEdgeLayer;

impl<S> tower::Layer<S> for GrpcEdgeLayer {
    type Service = GrpcEdge<S>;

    fn layer(&self, inner: S) -> GrpcEdge<S> {
        GrpcEdge(inner)
    }
}

#[derive(Debug, Clone)]
pub struct GrpcEdge<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for GrpcEdge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let fut = self.0.call(req);
        Box::pin(async move {
            match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(resp)) => Ok(decode_errors_are_invalid_argument(resp)),
                Ok(Err(e)) => Err(e),
                Err(panic) => {
                    let message = sluice_core::error::panic_message(&*panic);
                    tracing::error!(%path, %message, "a gRPC handler panicked");
                    Ok(tonic::Status::internal(format!("{path} failed: {message}")).into_http())
                }
            }
        })
    }
}

/// tonic answers a request it cannot decode with INTERNAL, "failed to decode Protobuf
/// message": the message is the client's, so the answer is INVALID_ARGUMENT.
fn decode_errors_are_invalid_argument(
    mut resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let h = resp.headers();
    let internal = h.get("grpc-status").is_some_and(|v| v == "13");
    let decode = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| {
            m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode")
        });
    if internal && decode {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    resp
}

/// What a panic hands to the HTTP edge.
type PanicHandler = fn(Box<dyn std::any::Any + Send + 'static>) -> http::Response<axum::body::Body>;

/// The HTTP edge: a panicking handler answers 500 with a JSON error.
pub fn http_catch_panic() -> tower_http::catch_panic::CatchPanicLayer<PanicHandler> {
    tower_http::catch_panic::CatchPanicLayer::custom(panic_response as fn(_) -> _)
}

fn panic_response(
    panic: Box<dyn std::any::Any + Send + 'static>,
) -> http::Response<axum::body::Body> {
    let message = sluice_core::error::panic_message(&*panic);
    tracing::error!(%message, "an HTTP handler panicked");
    let body = serde_json::json!({ "error": format!("internal error: {message}") }).to_string();
    http::Response::builder()
        .status(http::StatusCode::INTERNAL_SERVER_ERROR)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body))
        .expect("static response parts")
}

/// The one mapping of an [`Error`] to a gRPC status: the class decides the code, the
/// message is the error's.
pub fn status(e: Error) -> tonic::Status {
    match e {
        // A query past its limits fails again however often it is sent: the client's
        // error, as over HTTP (400), not RESOURCE_EXHAUSTED, which clients retry.
        Error::InvalidArgument(m) | Error::LimitExceeded(m) | Error::UnsupportedMediaType(m) => {
            tonic::Status::invalid_argument(m)
        }
        // As tonic answers a message over the size limit.
        Error::PayloadTooLarge(m) => tonic::Status::out_of_range(m),
        Error::NotFound(m) => tonic::Status::not_found(m),
        Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
        Error::ResourceExhausted(m) | Error::InsufficientStorage(m) => {
            tonic::Status::resource_exhausted(m)
        }
        Error::DeadlineExceeded(m) => tonic::Status::deadline_exceeded(m),
        Error::Unavailable(m) => tonic::Status::unavailable(m),
        Error::Internal(m) => tonic::Status::internal(m),
    }
}

/// An [`Error`] answered over HTTP: the one mapping to a status code, with a JSON body
/// `{"error": "..."}` and `Retry-After` where sending again later helps.
#[derive(Debug)]
pub struct HttpError(pub Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        HttpError(e)
    }
}

/// The one mapping of an [`Error`] to an HTTP status code.
pub fn http_status(e: &Error) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match e {
        Error::InvalidArgument(_) | Error::LimitExceeded(_) => StatusCode::BAD_REQUEST,
        Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::FailedPrecondition(_) => StatusCode::CONFLICT,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
        Error::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl axum::response::IntoResponse for HttpError {
    fn into_response(self) -> axum::response::Response {
        let status = http_status(&self.0);
        let mut resp = (
            status,
            axum::Json(serde_json::json!({"error": self.0.to_string()})),
        )
            .into_response();
        if self.0.is_retryable() {
            set_retry_after(&mut resp);
        }
        resp
    }
}

/// How long a client refused for lack of room (memory or WAL disk budget) is told to wait:
/// `Retry-After` on every HTTP door, `google.rpc.RetryInfo` over OTLP/gRPC.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Adds `Retry-After: <RETRY_AFTER in seconds>` to a refusal.
pub fn set_retry_after(resp: &mut axum::response::Response) {
    resp.headers_mut().insert(
        "retry-after",
        axum::http::HeaderValue::from(RETRY_AFTER.as_secs()),
    );
}
