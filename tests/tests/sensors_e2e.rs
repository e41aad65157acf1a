//! The sensor layer inside the real `outpost` binary: a Modbus TCP device simulated with
//! tokio-modbus's server is polled, its readings reach a `mosquitto_sub` on the DESIGN.md
//! topics, and a `.../set` message written with `mosquitto_pub` reaches the device.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cli::{MosquittoSub, mosquitto_pub};
use tokio::net::TcpListener;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// A boiler: input registers 0-1 hold 215.0 as an f32 (21.5 °C after scale 0.1),
/// holding register 10 is a writable setpoint.
#[derive(Clone, Default)]
struct Boiler {
    holding: Arc<Mutex<HashMap<u16, u16>>>,
}

impl Service for Boiler {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let input = [0x4357u16, 0x0000];
        let out = match req.request {
            Request::ReadInputRegisters(start, n) => (start..start + n)
                .map(|a| {
                    input
                        .get(usize::from(a))
                        .copied()
                        .ok_or(ExceptionCode::IllegalDataAddress)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| Some(Response::ReadInputRegisters(v))),
            Request::ReadHoldingRegisters(start, n) => {
                let h = self.holding.lock().unwrap();
                Ok(Some(Response::ReadHoldingRegisters(
                    (start..start + n)
                        .map(|a| h.get(&a).copied().unwrap_or(0))
                        .collect(),
                )))
            }
            Request::WriteSingleRegister(a, v) => {
                self.holding.lock().unwrap().insert(a, v);
                Ok(Some(Response::WriteSingleRegister(a, v)))
            }
            Request::WriteMultipleRegisters(a, vs) => {
                let mut h = self.holding.lock().unwrap();
                for (i, v) in vs.iter().enumerate() {
                    h.insert(a + i as u16, *v);
                }
                Ok(Some(Response::WriteMultipleRegisters(a, vs.len() as u16)))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        ready(out)
    }
}

async fn serve(boiler: Boiler) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = |stream, peer| {
            let b = boiler.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, move |_| {
                    Ok(Some(b.clone()))
                })
            }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_readings_reach_mqtt_and_set_writes_the_device() {
    if mosquitto_mode() {
        return; // the sensor layer is Outpost's own
    }
    let boiler = Boiler::default();
    let (sim, _sim_task) = serve(boiler.clone()).await;
    let config = format!(
        r#"gateway_id = "gw-01"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[sensors]
clock = "trusted"
[[sensors.modbus]]
name = "boiler"
transport = {{ tcp = {{ host = "127.0.0.1", port = {port} }} }}
unit = 1
every = "200ms"
points = [
  {{ name = "temperature", kind = "input", address = 0, type = "f32", word_order = "big", scale = 0.1, unit = "°C", deadband = 0.2, retain = true }},
  {{ name = "setpoint", kind = "holding", address = 10, type = "u16", scale = 0.1, writable = true, max = 90.0 }},
]
"#,
        port = sim.port()
    );
    let broker = Broker::outpost_with_full_config(&config);
    let port = broker.port();

    // Retained readings and status are there for a subscriber that comes late.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sub = MosquittoSub::start(port, "outpost/gw-01/sensors/boiler/+", 1, 3, 5, false).await;
    let msgs = sub.messages().await;
    let by_topic: HashMap<_, _> = msgs.iter().map(|m| (m.topic.as_str(), m)).collect();
    let temp = by_topic
        .get("outpost/gw-01/sensors/boiler/temperature")
        .unwrap_or_else(|| panic!("no temperature reading in {msgs:?}\n{}", broker.log()));
    let json: serde_json::Value = serde_json::from_str(&temp.payload).unwrap();
    assert_eq!(json["quality"], "good", "{json}");
    assert!(
        (json["value"].as_f64().unwrap() - 21.5).abs() < 1e-9,
        "{json}"
    );
    assert_eq!(json["unit"], "°C");
    assert!(temp.retain, "the point is configured retained");
    let status = by_topic
        .get("outpost/gw-01/sensors/boiler/status")
        .unwrap_or_else(|| panic!("no device status in {msgs:?}"));
    assert!(status.payload.contains("online"), "{}", status.payload);

    // Write-back: 45.5 with scale 0.1 is register value 455.
    let results = MosquittoSub::start(
        port,
        "outpost/gw-01/sensors/boiler/setpoint/set/result",
        1,
        1,
        5,
        false,
    )
    .await;
    mosquitto_pub(
        port,
        "outpost/gw-01/sensors/boiler/setpoint/set",
        "45.5",
        1,
        false,
        false,
    )
    .await;
    let r = results.messages().await;
    assert_eq!(r.len(), 1, "no write result: {}", broker.log());
    assert!(r[0].payload.contains("\"ok\":true"), "{}", r[0].payload);
    assert_eq!(boiler.holding.lock().unwrap().get(&10), Some(&455));
}
