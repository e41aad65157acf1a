//! The HTTP/1.1 server (hyper): routes, HTTP Basic login and the event stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use outpost_broker::config::UserConfig;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use super::HttpConfig;
use super::metrics;
use super::sample::{self, State};

/// A request's header must arrive within this, and an idle keep-alive connection is
/// closed after it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper's read buffer; its minimum is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// Password checks (argon2, deliberately slow) running at once; more wait.
const CONCURRENT_LOGINS: usize = 2;
/// Accepted `Authorization` values remembered, so a page's requests (one event stream
/// and a few assets) do not each pay for an argon2 check.
const REMEMBERED_LOGINS: usize = 8;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// A response body: a whole buffer, or the status event stream.
pub enum Body {
    /// The whole body (taken when sent).
    Full(Option<Bytes>),
    /// `text/event-stream` events as they come.
    Events(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Events(rx) => rx.poll_recv(cx).map(|e| e.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Events(_) => SizeHint::default(),
        }
    }
}

/// Routes and login of one `[http]` listener.
pub struct Server {
    state: Arc<State>,
    users: Vec<UserConfig>,
    max_connections: usize,
    logins: Semaphore,
    remembered: Mutex<VecDeque<Vec<u8>>>,
}

impl Server {
    /// A server for `config` reading `state`.
    pub fn new(config: &HttpConfig, state: Arc<State>) -> Server {
        Server {
            state,
            users: config.users.clone(),
            max_connections: config.max_connections,
            logins: Semaphore::new(CONCURRENT_LOGINS),
            remembered: Mutex::new(VecDeque::new()),
        }
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path();
        // `/healthz` answers without a login: a load balancer or a service manager asks
        // whether the process lives, and the answer reveals nothing.
        if path != "/healthz" && !self.users.is_empty() && !self.authorised(&req).await {
            let mut r = text(StatusCode::UNAUTHORIZED, "login required\n");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"outpost\", charset=\"UTF-8\""),
            );
            return r;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match path {
            "/" | "/index.html" => asset(INDEX_HTML, "text/html; charset=utf-8"),
            "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
            "/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
            "/metrics" => respond(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                Bytes::from(metrics::render(&self.state.latest())),
            ),
            "/api/status" => json_response(
                StatusCode::OK,
                serde_json::to_vec(&*self.state.latest()).unwrap_or_default(),
            ),
            "/api/history" => respond(
                StatusCode::OK,
                "application/json",
                self.state.history_json(),
            ),
            "/events" => self.events(),
            "/healthz" => self.healthz(),
            "/readyz" => self.readyz(),
            _ => text(StatusCode::NOT_FOUND, "no such page\n"),
        }
    }

    fn events(&self) -> Response<Body> {
        let Some(rx) = self.state.subscribe(self.max_connections) else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many status pages open at once\n",
            );
        };
        let mut r = Response::new(Body::Events(rx));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    fn healthz(&self) -> Response<Body> {
        let age = self.state.sample_age();
        let alive = age < Duration::from_secs(10);
        let body = json!({
            "status": if alive { "alive" } else { "stalled" },
            "detail": if alive {
                "the gateway answers and its statistics are fresh".to_owned()
            } else {
                format!("the statistics have not been refreshed for {}s", age.as_secs())
            },
            "uptime_s": self.state.latest().uptime_s,
        });
        json_response(
            if alive {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }

    fn readyz(&self) -> Response<Body> {
        let checks = sample::readiness(
            &self.state.latest(),
            self.state.ready_spool_fraction,
            self.state.sample_age(),
        );
        let ready = checks.iter().all(|c| c.ok);
        let body = json!({
            "status": if ready { "ready" } else { "not ready" },
            "checks": checks,
        });
        json_response(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }

    /// HTTP Basic (RFC 7617) against `[[http.users]]`.
    async fn authorised<B>(&self, req: &Request<B>) -> bool {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        if self
            .remembered
            .lock()
            .is_ok_and(|r| r.iter().any(|v| same(v, value)))
        {
            return true;
        }
        let Some((name, password)) = basic_credentials(value) else {
            return false;
        };
        let Some(user) = self.users.iter().find(|u| u.name == name) else {
            return false;
        };
        let Ok(_permit) = self.logins.acquire().await else {
            return false;
        };
        let hash = user.password_hash.clone();
        let ok = tokio::task::spawn_blocking(move || {
            outpost_broker::verify_password(password.as_bytes(), &hash)
        })
        .await
        .unwrap_or(false);
        if ok && let Ok(mut r) = self.remembered.lock() {
            if r.len() >= REMEMBERED_LOGINS {
                r.pop_front();
            }
            r.push_back(value.to_vec());
        }
        ok
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// how much of a remembered login a guess matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Basic base64(name:password)` into its parts.
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    use base64ct::{Base64, Encoding};
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 1024 {
        return None;
    }
    let decoded = Base64::decode_vec(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (name, password) = decoded.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = respond(
        StatusCode::OK,
        content_type,
        Bytes::from_static(body.as_bytes()),
    );
    // Everything the page runs comes from here; nothing inline, nothing from elsewhere.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    respond(status, "application/json", Bytes::from(body))
}

/// Accepts connections until `shutdown`, at most `max_connections` at once.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: Arc<Server>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(server.max_connections));
    loop {
        // Wait for a free slot before accepting: past the bound, connections queue in
        // the kernel's backlog instead of costing memory here.
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, usually: wait a moment rather than spin.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let server = Arc::clone(&server);
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, server).await,
                Some(acceptor) => {
                    // The handshake gets the same bound as a request head.
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_connection(s, peer, server).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<S>(stream: S, peer: std::net::SocketAddr, server: Arc<Server>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let server = Arc::clone(&server);
        async move { Ok::<_, Infallible>(server.handle(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse_and_refuse_garbage() {
        // "tech:pa:ss" — the password may hold colons (RFC 7617 splits at the first).
        assert_eq!(
            basic_credentials(b"Basic dGVjaDpwYTpzcw=="),
            Some(("tech".into(), "pa:ss".into()))
        );
        assert_eq!(
            basic_credentials(b"basic dGVjaDpwYTpzcw=="),
            Some(("tech".into(), "pa:ss".into()))
        );
        for bad in [
            &b"Bearer dGVjaDpwYTpzcw=="[..],
            b"Basic",
            b"Basic !!!",
            b"Basic dGVjaA==", // no colon
            b"\xff\xfe",
        ] {
            assert_eq!(basic_credentials(bad), None, "{bad:?}");
        }
        let long = format!("Basic {}", "A".repeat(5000));
        assert_eq!(basic_credentials(long.as_bytes()), None);
    }

    #[test]
    fn same_compares_whole_values() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
