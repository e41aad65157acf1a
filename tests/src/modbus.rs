//! A simulated Modbus TCP device (tokio-modbus's own server) for end-to-end tests.

use std::future::{Ready, ready};

use tokio::net::TcpListener;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Holding registers 0..16 that read as 42 and accept writes.
#[derive(Clone)]
pub struct Device;

impl Service for Device {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(match req.request {
            Request::ReadHoldingRegisters(start, n) if u32::from(start) + u32::from(n) <= 16 => {
                Ok(Some(Response::ReadHoldingRegisters(vec![
                    42;
                    usize::from(n)
                ])))
            }
            Request::WriteSingleRegister(a, v) => Ok(Some(Response::WriteSingleRegister(a, v))),
            Request::ReadHoldingRegisters(..) => Err(ExceptionCode::IllegalDataAddress),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

/// A simulated Modbus TCP device on an ephemeral loopback port: its port and the server
/// task (abort it to take the device away).
pub async fn serve() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = |stream, peer| async move {
            tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, |_| Ok(Some(Device)))
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    (port, task)
}
