//! Test-only fault points: a debug build told so by `OUTPOST_FAULT` dies at the worst
//! moment for one promise, so tests can show that promise holds after a crash.
//!
//! `OUTPOST_FAULT=abort-after:pubcomp` (or `puback`, `pubrec`, `pubrel`, `suback`,
//! `unsuback`) aborts the process as soon as the first such packet has been handed to the
//! kernel for a client: the client has it, and nothing after it happened. The module and
//! every check of it exist in debug builds only.

use outpost_mqtt::Packet;

/// True when the process must abort once `packet` is written to its client.
pub fn abort_after(packet: &Packet) -> bool {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("OUTPOST_FAULT")
            .ok()
            .and_then(|v| v.strip_prefix("abort-after:").map(str::to_owned))
    });
    let Some(name) = armed.as_deref() else {
        return false;
    };
    let kind = match packet {
        Packet::PubAck(_) => "puback",
        Packet::PubRec(_) => "pubrec",
        Packet::PubRel(_) => "pubrel",
        Packet::PubComp(_) => "pubcomp",
        Packet::SubAck(_) => "suback",
        Packet::UnsubAck(_) => "unsuback",
        _ => return false,
    };
    kind == name
}
