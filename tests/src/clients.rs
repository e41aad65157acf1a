//! rumqttc clients (3.1.1 and 5.0) whose event loops run on their own task and report
//! every event through a channel, so tests can wait for exactly what they expect.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

/// How long a client may take to get its CONNACK.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);

macro_rules! rumqttc_client {
    ($name:ident, [$($m:ident)::+], $packet:ident, $event:ident, $publish:path, $connack:path, $cfg_doc:literal) => {
        #[doc = $cfg_doc]
        pub struct $name {
            /// The rumqttc handle for publishing, subscribing, disconnecting.
            pub client: $($m)::+::AsyncClient,
            events: mpsc::UnboundedReceiver<Result<$($m)::+::Event, String>>,
            task: JoinHandle<()>,
            /// Set once the event loop reported an error (connection gone).
            pub closed: Option<String>,
        }

        impl $name {
            /// Connect with `id` and options adjusted by `tweak`; returns the CONNACK.
            pub async fn connect(
                port: u16,
                id: &str,
                tweak: impl FnOnce(&mut $($m)::+::MqttOptions),
            ) -> ($name, $connack) {
                let (mut c, ack) = Self::try_connect(port, id, tweak).await;
                match ack {
                    Ok(ack) => {
                        c.closed = None;
                        (c, ack)
                    }
                    Err(e) => panic!("{} connect of {id} failed: {e}", stringify!($name)),
                }
            }

            /// Connect and report the CONNACK or the connection error.
            pub async fn try_connect(
                port: u16,
                id: &str,
                tweak: impl FnOnce(&mut $($m)::+::MqttOptions),
            ) -> ($name, Result<$connack, String>) {
                let mut opts = $($m)::+::MqttOptions::new(id, "127.0.0.1", port);
                opts.set_keep_alive(Duration::from_secs(30));
                tweak(&mut opts);
                let (client, mut eventloop) = $($m)::+::AsyncClient::new(opts, 1000);
                let (tx, events) = mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(ev) => {
                                if tx.send(Ok(ev)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                // Polling again would reconnect; tests want to see the drop.
                                let _ = tx.send(Err(e.to_string()));
                                return;
                            }
                        }
                    }
                });
                let mut c = $name {
                    client,
                    events,
                    task,
                    closed: None,
                };
                let ack = c
                    .wait_for(CONNECT_WAIT, |p| match p {
                        $packet::ConnAck(a) => Some(a.clone()),
                        _ => None,
                    })
                    .await
                    .ok_or_else(|| c.closed.clone().unwrap_or_else(|| "no CONNACK".into()));
                (c, ack)
            }

            /// Wait for an incoming packet that `pick` accepts; other events are skipped.
            /// `None` on timeout or when the connection ends (see `closed`).
            pub async fn wait_for<T>(
                &mut self,
                wait: Duration,
                mut pick: impl FnMut(&$packet) -> Option<T>,
            ) -> Option<T> {
                let deadline = Instant::now() + wait;
                loop {
                    match timeout_at(deadline, self.events.recv()).await {
                        Err(_) | Ok(None) => return None,
                        Ok(Some(Err(e))) => {
                            self.closed = Some(e);
                            return None;
                        }
                        Ok(Some(Ok($event::Incoming(p)))) => {
                            if let Some(t) = pick(&p) {
                                return Some(t);
                            }
                        }
                        Ok(Some(Ok(_))) => {}
                    }
                }
            }

            /// The next incoming PUBLISH within `wait`.
            pub async fn next_publish(&mut self, wait: Duration) -> Option<$publish> {
                self.wait_for(wait, |p| match p {
                    $packet::Publish(p) => Some(p.clone()),
                    _ => None,
                })
                .await
            }

            /// The next incoming PUBLISH; panics if none arrives in `wait`.
            pub async fn expect_publish(&mut self, wait: Duration) -> $publish {
                match self.next_publish(wait).await {
                    Some(p) => p,
                    None => panic!(
                        "no PUBLISH within {wait:?} (connection error: {:?})",
                        self.closed
                    ),
                }
            }

            /// Exactly the next `n` PUBLISHes; panics if fewer arrive within `wait` in total.
            pub async fn expect_publishes(&mut self, n: usize, wait: Duration) -> Vec<$publish> {
                let deadline = Instant::now() + wait;
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    match self
                        .next_publish(deadline.saturating_duration_since(Instant::now()))
                        .await
                    {
                        Some(p) => out.push(p),
                        None => panic!(
                            "only {} of {n} PUBLISHes within {wait:?} (connection error: {:?}): {out:?}",
                            out.len(),
                            self.closed
                        ),
                    }
                }
                out
            }

            /// Every PUBLISH received during `wait`.
            pub async fn publishes_during(&mut self, wait: Duration) -> Vec<$publish> {
                let deadline = Instant::now() + wait;
                let mut out = Vec::new();
                while let Some(p) = self
                    .next_publish(deadline.saturating_duration_since(Instant::now()))
                    .await
                {
                    out.push(p);
                }
                out
            }

            /// Wait for the SUBACK of a subscribe that was just sent.
            pub async fn expect_suback(&mut self) {
                let got = self
                    .wait_for(CONNECT_WAIT, |p| matches!(p, $packet::SubAck(_)).then_some(()))
                    .await;
                assert!(got.is_some(), "no SUBACK (connection error: {:?})", self.closed);
            }

            /// Wait for the PUBACK (QoS 1) or PUBCOMP (QoS 2) that ends a publish.
            pub async fn expect_publish_done(&mut self) {
                let got = self
                    .wait_for(CONNECT_WAIT, |p| {
                        matches!(p, $packet::PubAck(_) | $packet::PubComp(_)).then_some(())
                    })
                    .await;
                assert!(got.is_some(), "publish not acknowledged (connection error: {:?})", self.closed);
            }

            /// Wait until the connection ends; returns the error text or `None` on timeout.
            pub async fn wait_closed(&mut self, wait: Duration) -> Option<String> {
                if self.closed.is_some() {
                    return self.closed.clone();
                }
                let deadline = Instant::now() + wait;
                loop {
                    match timeout_at(deadline, self.events.recv()).await {
                        Err(_) => return None,
                        Ok(None) => return Some("event loop ended".into()),
                        Ok(Some(Err(e))) => {
                            self.closed = Some(e.clone());
                            return Some(e);
                        }
                        Ok(Some(Ok(_))) => {}
                    }
                }
            }

            /// Send DISCONNECT and give the event loop a moment to flush it.
            pub async fn disconnect(mut self) {
                self.client.disconnect().await.expect("queue DISCONNECT");
                let _ = self.wait_closed(Duration::from_secs(2)).await;
            }

            /// Stop the event loop and drop the socket without DISCONNECT.
            pub fn drop_abruptly(self) {
                self.task.abort();
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.task.abort();
            }
        }
    };
}

type V4Packet = rumqttc::Packet;
type V4Event = rumqttc::Event;
type V5Packet = rumqttc::v5::mqttbytes::v5::Packet;
type V5Event = rumqttc::v5::Event;

rumqttc_client!(
    V4Client,
    [rumqttc],
    V4Packet,
    V4Event,
    rumqttc::Publish,
    rumqttc::ConnAck,
    "An MQTT 3.1.1 rumqttc client."
);

rumqttc_client!(
    V5Client,
    [rumqttc::v5],
    V5Packet,
    V5Event,
    rumqttc::v5::mqttbytes::v5::Publish,
    rumqttc::v5::mqttbytes::v5::ConnAck,
    "An MQTT 5.0 rumqttc client."
);
