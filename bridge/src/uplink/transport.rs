//! Opening the byte stream to the cloud: TCP, optionally wrapped in TLS, optionally
//! carrying a WebSocket.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::client::MAX_INCOMING_PACKET;
use crate::config::{Address, Scheme};

/// A bidirectional byte stream to the cloud broker.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connect to `addr`; TLS when `tls` is given (SNI from `server_name` or the host), then
/// the WebSocket handshake for `ws://` and `wss://`, whose frames are bounded by the
/// largest packet the bridge takes.
pub async fn connect(
    addr: &Address,
    tls: Option<(&Arc<ClientConfig>, Option<&str>)>,
) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
    tcp.set_nodelay(true)?;
    let host = if addr.host.contains(':') {
        format!("[{}]", addr.host)
    } else {
        addr.host.clone()
    };
    let Some((config, server_name)) = tls else {
        if addr.scheme == Scheme::Ws {
            let url = format!("ws://{host}:{}{}", addr.port, addr.path);
            let ws = outpost_ws::connect(&url, tcp, MAX_INCOMING_PACKET).await?;
            tracing::debug!(%url, "websocket handshake done");
            return Ok(Box::new(ws));
        }
        return Ok(Box::new(tcp));
    };
    let name = server_name.unwrap_or(&addr.host).to_string();
    let name = ServerName::try_from(name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?;
    if addr.scheme == Scheme::Wss {
        let url = format!("wss://{host}:{}{}", addr.port, addr.path);
        return Ok(Box::new(
            outpost_ws::connect(&url, stream, MAX_INCOMING_PACKET).await?,
        ));
    }
    Ok(Box::new(stream))
}
