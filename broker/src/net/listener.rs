//! Listening sockets: TCP, TLS and WebSocket (plain or over TLS), all feeding the same
//! connection code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::connection;
use super::tls;
use super::{ConnContext, Runtime};
use crate::config::ListenerConfig;
use crate::events::CoreInbox;
use crate::limits::ConnectionSlot;
use crate::settings::{Settings, SharedSettings};

/// A TLS acceptor that a reload can replace: connections accepted afterwards get the
/// new certificate, those already running keep their session.
#[derive(Clone)]
struct TlsCell(Arc<std::sync::RwLock<TlsAcceptor>>);

impl TlsCell {
    fn get(&self) -> TlsAcceptor {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, a: TlsAcceptor) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = a;
    }
}

/// A bound listener, ready to accept.
pub struct BoundListener {
    socket: TcpListener,
    tls: Option<TlsCell>,
    websocket: Option<String>,
    /// The address actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
    /// What it was bound from, to tell on reload whether it changed.
    pub config: ListenerConfig,
}

/// A listener that is accepting connections.
pub struct ServingListener {
    accept: tokio::task::JoinHandle<()>,
    tls: Option<TlsCell>,
    transport: &'static str,
    /// The address actually bound.
    pub local_addr: SocketAddr,
    /// What it was bound from.
    pub config: ListenerConfig,
}

impl ServingListener {
    /// "tcp", "tls", "ws" or "wss".
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// Reads the TLS files again (a renewed certificate) for connections accepted from
    /// now on; on error the listener keeps the certificate it had.
    pub fn reload_tls(&self) -> Result<bool, ListenError> {
        let (Some(cell), Some(cfg)) = (&self.tls, &self.config.tls) else {
            return Ok(false);
        };
        let acceptor = acceptor(&self.config, cfg)?;
        cell.set(acceptor);
        Ok(true)
    }

    /// Stops accepting and closes the socket (it is closed when this returns, so the
    /// address can be bound again). Connections it accepted keep running until they end.
    pub async fn stop(self) {
        self.accept.abort();
        let _ = self.accept.await;
    }
}

/// Loads a listener's TLS files the way binding it would, without binding: a reload
/// checks every listener before it changes any.
pub fn check_tls(c: &ListenerConfig) -> Result<(), ListenError> {
    match &c.tls {
        Some(t) => acceptor(c, t).map(|_| ()),
        None => Ok(()),
    }
}

fn acceptor(c: &ListenerConfig, t: &crate::config::TlsConfig) -> Result<TlsAcceptor, ListenError> {
    tls::server_config(t)
        .map(TlsAcceptor::from)
        .map_err(|source| ListenError::Tls {
            addr: c.bind,
            source,
        })
}

impl BoundListener {
    /// "tcp", "tls", "ws" or "wss".
    pub fn transport(&self) -> &'static str {
        match (self.tls.is_some(), self.websocket.is_some()) {
            (false, false) => "tcp",
            (true, false) => "tls",
            (false, true) => "ws",
            (true, true) => "wss",
        }
    }
}

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS files are wrong.
    #[error("listener {addr}: TLS setup failed")]
    Tls {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: tls::TlsError,
    },
}

/// Binds every configured listener before anything is served, so a bad one stops the
/// start instead of leaving a half-working gateway.
pub async fn bind_listeners(configs: &[ListenerConfig]) -> Result<Vec<BoundListener>, ListenError> {
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
        let tls = match &c.tls {
            Some(t) => Some(TlsCell(Arc::new(std::sync::RwLock::new(acceptor(c, t)?)))),
            None => None,
        };
        let socket = TcpListener::bind(c.bind)
            .await
            .map_err(|source| ListenError::Bind {
                addr: c.bind,
                source,
            })?;
        let local_addr = socket.local_addr().map_err(|source| ListenError::Bind {
            addr: c.bind,
            source,
        })?;
        let l = BoundListener {
            socket,
            tls,
            websocket: c.websocket.clone(),
            local_addr,
            config: c.clone(),
        };
        info!(transport = %l.transport(), addr = %local_addr, "listening");
        out.push(l);
    }
    Ok(out)
}

/// Accepts connections until stopped, one task per connection.
pub fn spawn_accept_loop(
    l: BoundListener,
    core: CoreInbox,
    settings: SharedSettings,
    runtime: Runtime,
) -> ServingListener {
    let transport = l.transport();
    let tls = l.tls.clone();
    let local_addr = l.local_addr;
    let config = l.config.clone();
    let accept = tokio::spawn(async move {
        let mut context = None;
        loop {
            match l.socket.accept().await {
                Ok((stream, peer)) => {
                    let ctx = runtime.context_for(&mut context, settings.get_for(l.config.bind));
                    // Over a bound: closed before a byte is read (counted and logged).
                    let Ok(slot) = ctx.settings.connections.admit(peer.ip()) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    spawn_connection(
                        stream,
                        peer,
                        slot,
                        l.tls.as_ref().map(TlsCell::get),
                        l.websocket.clone(),
                        core.clone(),
                        ctx,
                    );
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    warn!(error = %e, addr = %l.local_addr, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    ServingListener {
        accept,
        tls,
        transport,
        local_addr,
        config,
    }
}

/// One task per connection. Plain TCP gets the small hand-written connection future;
/// TLS and WebSocket connections get their own task type, so their large handshake
/// futures never size the plain ones.
fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    tls: Option<TlsAcceptor>,
    websocket: Option<String>,
    core: CoreInbox,
    ctx: Arc<ConnContext>,
) {
    match (tls, websocket) {
        (None, None) => {
            tokio::spawn(connection::serve_tcp(stream, peer, slot, core, ctx));
        }
        (tls, ws) => {
            tokio::spawn(handle_wrapped(stream, peer, slot, tls, ws, core, ctx));
        }
    }
}

async fn handle_wrapped(
    stream: TcpStream,
    peer: SocketAddr,
    // Held until the connection ends, whatever stage that happens in.
    _slot: ConnectionSlot,
    tls: Option<TlsAcceptor>,
    websocket: Option<String>,
    core: CoreInbox,
    ctx: Arc<ConnContext>,
) {
    // One deadline for the TLS and WebSocket handshakes and the CONNECT together.
    let connect_by = Instant::now() + ctx.settings.connect_timeout;
    let Some(acceptor) = tls else {
        if let Some(path) = websocket {
            Box::pin(serve_websocket(
                stream, &path, peer, core, ctx, connect_by, None,
            ))
            .await;
        }
        return;
    };
    // The handshake and WebSocket futures are boxed: inline, the largest of them (about
    // 13 KB) would size this task for the connection's whole life, long after the
    // handshake is over; boxed, it is freed when the handshake ends.
    let accept = Box::pin(acceptor.accept(stream));
    let tls = match tokio::time::timeout_at(connect_by.into(), accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    // By value and back: a local the async fn itself borrowed would be kept in the task's
    // state for the connection's life (the generator cannot tell the borrow ended).
    let (tls, identity) = tls_identity(tls, &ctx.settings);
    match websocket {
        None => connection::serve_stream(tls, peer, core, ctx, connect_by, identity).await,
        Some(path) => {
            Box::pin(serve_websocket(
                tls, &path, peer, core, ctx, connect_by, identity,
            ))
            .await
        }
    }
}

/// The Common Name of the client's certificate, when the listener takes user names from
/// certificates.
fn tls_identity(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    settings: &Settings,
) -> (tokio_rustls::server::TlsStream<TcpStream>, Option<String>) {
    let identity = settings
        .identity_as_username
        .then(|| tls.get_ref().1.peer_certificates())
        .flatten()
        .and_then(|c| c.first())
        .and_then(tls::common_name);
    (tls, identity)
}

async fn serve_websocket<S>(
    stream: S,
    path: &str,
    peer: SocketAddr,
    core: CoreInbox,
    ctx: Arc<ConnContext>,
    connect_by: Instant,
    identity: Option<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let accept = outpost_ws::accept(stream, path, ctx.settings.max_packet_size);
    match tokio::time::timeout_at(connect_by.into(), accept).await {
        Ok(Ok(s)) => connection::serve_stream(s, peer, core, ctx, connect_by, identity).await,
        Ok(Err(e)) => info!(%peer, error = %e, "WebSocket handshake failed"),
        Err(_) => debug!(%peer, "WebSocket handshake timed out"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::Settings;

    /// A client costs its connection task (while it has one: a quiet plain-TCP client
    /// is parked without it, see `connection/driver.rs`) plus its session; both are
    /// budgeted (an idle client: about 504 bytes at 10,000, bench/RESULTS-idle.md).
    /// tokio rounds a task up to 128-byte cache lines with about 104 bytes of its own,
    /// so a future above 152 bytes costs a whole extra line per client. A regression here usually means a field that only busy
    /// connections need was added inline; put it behind a lazily allocated box (`Busy`
    /// in `connection/driver.rs`, `Tables` in `connection/state.rs`, `Flows` in
    /// `broker/src/session.rs`).
    #[tokio::test]
    async fn idle_connection_state_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let settings = Arc::new(Settings::from_config(&Default::default()));
        let core =
            crate::events::CoreInbox::new(crate::core::spawn(settings.clone(), vec![], None));
        let slot = settings.connections.admit(addr.ip()).unwrap();
        let ctx = crate::net::Runtime::new().context(settings);
        let task = crate::net::connection::serve_tcp(c, addr, slot, core, ctx);
        let task_size = std::mem::size_of_val(&task);
        let session_size = std::mem::size_of::<crate::session::Session>();
        assert!(task_size <= 152, "connection task is {task_size} bytes");
        // 120 bytes (the client id inline) is still a 128-byte chunk in the slab's box.
        assert!(session_size <= 120, "session is {session_size} bytes");
    }

    /// A TLS or WebSocket client's task outlives its handshake by hours; the handshake
    /// futures (a whole rustls `ServerConnection`, the WebSocket upgrade) are boxed so the
    /// task does not carry their size for the connection's life. Inline they made it
    /// 13,128 bytes, and an idle TLS client cost 22 KB of broker memory instead of 11 KB
    /// (bench/RESULTS-tls.md).
    #[tokio::test]
    async fn tls_connection_task_does_not_keep_the_handshake() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let settings = Arc::new(Settings::from_config(&Default::default()));
        let core =
            crate::events::CoreInbox::new(crate::core::spawn(settings.clone(), vec![], None));
        let slot = settings.connections.admit(addr.ip()).unwrap();
        let ctx = crate::net::Runtime::new().context(settings);
        // The future's type, hence its size, is the same whichever acceptor is passed.
        let task = super::handle_wrapped(c, addr, slot, None, None, core, ctx);
        let task_size = std::mem::size_of_val(&task);
        // 1,712 bytes in a debug build (13,128 with the handshake inline); a handshake
        // future creeping back inline would be several KiB.
        assert!(
            task_size <= 2048,
            "TLS connection task is {task_size} bytes"
        );
    }
}
