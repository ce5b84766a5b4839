//! The demo page at `/` of the socket.io listener, and the stock
//! socket.io client (4.8.1, MIT) it loads from `/client/socket.io.min.js`:
//! no build step, nothing fetched from elsewhere.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header};
use std::convert::Infallible;
use std::future::{Ready, ready};

const INDEX: &str = include_str!("assets/index.html");
const CLIENT: &str = include_str!("assets/socket.io.min.js");

/// What the socket.io listener serves outside `/socket.io/`.
#[derive(Debug, Clone, Copy)]
pub struct Page;

fn response(status: StatusCode, kind: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r
}

impl<B> hyper::service::Service<Request<B>> for Page {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        ready(Ok(match req.uri().path() {
            "/" | "/index.html" => response(StatusCode::OK, "text/html; charset=utf-8", INDEX),
            "/client/socket.io.min.js" => {
                response(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT)
            }
            _ => response(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: this listener serves socket.io at /socket.io/ and its demo page at /\n",
            ),
        }))
    }
}
