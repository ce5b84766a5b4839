//! The one place gRPC calls are counted: a wrapper of the `Spool` service
//! that reports each call's operation, status code and time to
//! [`Metrics::request`] once its response headers are ready (a unary call's
//! whole answer; a stream's opening, with the code it opened with), and
//! marked busy on their connection while they are served.

use super::connection::ConnInfo;
use crate::metrics::Metrics;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

/// The `Spool` service `S`, its calls counted into `metrics`.
#[derive(Debug, Clone)]
pub(crate) struct Measured<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> Measured<S> {
    pub(crate) fn new(inner: S, metrics: Metrics) -> Measured<S> {
        Measured { inner, metrics }
    }
}

impl<S: NamedService> NamedService for Measured<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for Measured<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let operation = operation(request.uri().path());
        let started = Instant::now();
        // A call being served keeps its connection from being idle until
        // its answer (a stream: its opening; open streams count themselves).
        let busy = request.extensions().get::<ConnInfo>().map(ConnInfo::busy);
        let call = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = call.await?;
            drop(busy);
            // An error is answered in the headers (trailers-only); a call
            // that succeeds sends its status in the trailers, after the body.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .unwrap_or(0);
            metrics.request(super::LISTENER, operation, code, started.elapsed());
            Ok(response)
        })
    }
}

/// The operation of a call to path `/spool.v1.Spool/Method`, by the same
/// names as the native transport's.
fn operation(path: &str) -> &'static str {
    match path.rsplit('/').next().unwrap_or_default() {
        "Produce" => "produce",
        "Fetch" => "fetch",
        "Subscribe" => "subscribe",
        "Consume" => "consume",
        "Ack" => "ack",
        "Nack" => "nack",
        "Commit" => "commit",
        "Seek" => "seek",
        "Delete" => "delete",
        "CreateTopic" => "create_topic",
        "ListTopics" => "list_topics",
        "DescribeTopic" => "describe_topic",
        "DeleteTopic" => "delete_topic",
        "CreateGroup" => "create_group",
        "ListGroups" => "list_groups",
        "DescribeGroup" => "describe_group",
        "DeleteGroup" => "delete_group",
        "Compact" => "compact",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_service_has_an_operation_name() {
        let methods = [
            "Produce",
            "Fetch",
            "Subscribe",
            "Consume",
            "Ack",
            "Nack",
            "Commit",
            "Seek",
            "Delete",
            "CreateTopic",
            "ListTopics",
            "DescribeTopic",
            "DeleteTopic",
            "CreateGroup",
            "ListGroups",
            "DescribeGroup",
            "DeleteGroup",
            "Compact",
        ];
        for m in methods {
            assert_ne!(operation(&format!("/spool.v1.Spool/{m}")), "unknown", "{m}");
        }
        assert_eq!(operation("/spool.v1.Spool/Nope"), "unknown");
    }
}
