//! The SQLite file behind the broker store: the schema, opening it (durable settings and
//! setting a damaged file aside are `outpost_sqlite`'s), and loading what an earlier run
//! left.
//!
//! Messages are kept as encoded MQTT 5.0 PUBLISH packets: the codec that reads the wire
//! already checks every field, so a row that does not decode is refused the same way a
//! malformed packet would be, and no second serialisation format has to be kept in step
//! with the message type.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use outpost_mqtt::{Packet, Protocol, Publish, QoS, RetainHandling, SubscriptionOptions};
use rusqlite::{Connection, params};
use tracing::{error, info, warn};

use super::StoreError;
use crate::message::Delivery;
use crate::message::Message;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id        INTEGER PRIMARY KEY,
    client_id TEXT    NOT NULL UNIQUE,
    protocol  INTEGER NOT NULL,          -- 3, 4 or 5 (the CONNECT protocol level)
    expiry    INTEGER NOT NULL           -- seconds after disconnect; 4294967295 never
);
CREATE TABLE IF NOT EXISTS subscriptions (
    session         INTEGER NOT NULL,
    filter          TEXT    NOT NULL,    -- as the client wrote it, $share/... included
    qos             INTEGER NOT NULL,
    no_local        INTEGER NOT NULL,
    retain_as_pub   INTEGER NOT NULL,
    retain_handling INTEGER NOT NULL,
    sub_id          INTEGER,             -- 5.0 subscription identifier
    PRIMARY KEY (session, filter)
) WITHOUT ROWID;
-- Messages owed to a session: queued (packet_id NULL) or in flight.
CREATE TABLE IF NOT EXISTS deliveries (
    id         INTEGER PRIMARY KEY,      -- the order they were owed in
    session    INTEGER NOT NULL,
    publish    BLOB    NOT NULL,         -- the message as a 5.0 PUBLISH, QoS as delivered
    expires_ms INTEGER,                  -- Message Expiry as a wall-clock time
    sub_ids    BLOB,                     -- subscription identifiers, 4 bytes each
    packet_id  INTEGER,
    released   INTEGER NOT NULL DEFAULT 0, -- QoS 2: PUBREC came, PUBREL sent
    crc        INTEGER                   -- CRC-32C of publish (NULL: written before checksums)
);
CREATE INDEX IF NOT EXISTS deliveries_by_session ON deliveries(session);
-- A message owed to several sessions is kept once: their deliveries point at it
-- (deliveries.message) with an empty publish, and carry their own qos and retain.
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY,
    publish BLOB    NOT NULL,            -- as published (QoS and RETAIN of the publisher)
    crc     INTEGER NOT NULL
);
-- Inbound QoS 2 exchanges waiting for the client's PUBREL.
CREATE TABLE IF NOT EXISTS incoming_qos2 (
    session   INTEGER NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (session, packet_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (
    topic      TEXT PRIMARY KEY,
    publish    BLOB    NOT NULL,
    expires_ms INTEGER,
    crc        INTEGER                   -- CRC-32C of publish (NULL: written before checksums)
) WITHOUT ROWID;
";

/// Checksums of stored messages: SQLite checks its pages, not that the bytes a message
/// was written with are the bytes read back (a failing SD card returns other data
/// without an error).
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The checksum stored beside a message's bytes.
pub fn checksum(blob: &[u8]) -> i64 {
    i64::from(CRC.checksum(blob))
}

/// Why the file's contents could not be taken in.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// SQLite failed.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored message's bytes are not the bytes that were written.
    #[error("the {what} checksum does not match its bytes: the file or the card is damaged")]
    Checksum {
        /// Which message ("retained message on TOPIC", "queued message N").
        what: String,
    },
}

/// Brings a file from an earlier version up to this schema: checksum columns, and the
/// columns of deliveries that share a message.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let columns = [
        ("retained", "crc"),
        ("deliveries", "crc"),
        ("deliveries", "message"),
        ("deliveries", "qos"),
        ("deliveries", "retain"),
    ];
    for (table, column) in columns {
        let has: bool = conn.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"),
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} INTEGER"))?;
        }
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS deliveries_by_message ON deliveries(message)
         WHERE message IS NOT NULL",
    )
}

/// Checks a stored message against its checksum (none for rows from before them).
fn verify(blob: &[u8], crc: Option<i64>, what: impl FnOnce() -> String) -> Result<(), LoadError> {
    match crc {
        Some(c) if c != checksum(blob) => Err(LoadError::Checksum { what: what() }),
        _ => Ok(()),
    }
}

/// What an earlier run left: retained messages and persistent sessions.
#[derive(Default)]
pub struct Loaded {
    /// Retained messages, not yet expired.
    pub retained: Vec<Arc<Message>>,
    /// Persistent sessions, all offline.
    pub sessions: Vec<LoadedSession>,
    /// Highest session id in the file.
    pub max_session_id: u32,
    /// Highest delivery id in the file.
    pub max_delivery_id: u64,
}

/// One persistent session as stored.
pub struct LoadedSession {
    /// Its id in the store.
    pub id: u32,
    /// Client identifier.
    pub client_id: String,
    /// Protocol of its last connection.
    pub protocol: Protocol,
    /// Session expiry interval in seconds.
    pub expiry: u32,
    /// Subscriptions: the filter as written, its options and subscription identifier.
    pub subs: Vec<(String, SubscriptionOptions, Option<u32>)>,
    /// Messages owed, in order: delivery id, packet id when in flight, PUBREL sent.
    pub deliveries: Vec<(u64, Option<u16>, bool, Delivery)>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub incoming_qos2: Vec<u16>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The wall-clock time a message expires, for a file that outlives this process's clock.
pub fn expires_ms(msg: &Message) -> Option<i64> {
    let now = Instant::now();
    msg.expires_at.map(|t| {
        let left = t.saturating_duration_since(now);
        unix_ms(SystemTime::now()).saturating_add(i64::try_from(left.as_millis()).unwrap_or(0))
    })
}

/// The message as a 5.0 PUBLISH with `qos` and `retain`, ready for a BLOB column.
pub fn encode_publish(msg: &Message, qos: QoS, retain: bool) -> Vec<u8> {
    let p = Publish {
        dup: false,
        qos,
        retain,
        topic: msg.topic.clone(),
        // A placeholder: the real identifier, when there is one, has its own column.
        packet_id: (qos != QoS::AtMostOnce).then_some(1),
        properties: msg.properties.clone(),
        payload: msg.payload.clone(),
    };
    let mut buf = BytesMut::with_capacity(msg.topic.len() + msg.payload.len() + 16);
    // A message that was decoded from a client always encodes again; if not, the row
    // is empty and is refused on load rather than taking the writer down.
    if outpost_mqtt::codec::encode_publish(&p, Protocol::V5, &mut buf).is_err() {
        buf.clear();
    }
    buf.to_vec()
}

/// A stored PUBLISH back as a message; `None` (with a warning) for a row that does not
/// decode, so one damaged row costs that message, not the start-up.
fn decode_publish(blob: &[u8], expires: Option<i64>, now_ms: i64, what: &str) -> Option<Message> {
    let mut buf = BytesMut::from(blob);
    let p = match outpost_mqtt::decode(&mut buf, Protocol::V5, usize::MAX) {
        Ok(Some(Packet::Publish(p))) => p,
        other => {
            let why = match other {
                Err(e) => e.to_string(),
                _ => "not a PUBLISH".to_owned(),
            };
            warn!(row = what, error = %why, "broker store: skipping a stored message that does not decode");
            return None;
        }
    };
    let expires_at = match expires {
        Some(ms) if ms <= now_ms => return None,
        Some(ms) => Some(Instant::now() + Duration::from_millis((ms - now_ms) as u64)),
        None => None,
    };
    Some(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: p.properties,
        expires_at,
        origin: None,
        skip_sink: None,
    })
}

/// Page cache of the store's connection, in KiB: the writer appends and deletes recent
/// rows, so a small cache is enough, and this runs on boards with little memory.
const CACHE_KIB: u32 = 512;

/// Opens (creating if needed) the store at `path`. A damaged file is set aside, not
/// deleted, and a new one started: the broker must come up on an appliance nobody is
/// watching, and the old file stays for whoever wants to look.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        warn!(
            store = %path.display(),
            "broker store file is empty (0 bytes; truncated by a crash or a full disk?): \
             starting without retained messages or persistent sessions"
        );
    }
    let opened = outpost_sqlite::open(path, SCHEMA, Some(CACHE_KIB))?;
    migrate(&opened.conn).map_err(|source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    })?;
    match &opened.page_size_change {
        Some(change) if change.is_failure() => {
            warn!(store = %path.display(), "broker store {change}")
        }
        Some(change) => info!(store = %path.display(), "broker store {change}"),
        None => {}
    }
    if let Some(aside) = &opened.set_aside {
        error!(
            store = %path.display(),
            kept_as = %aside.path.display(),
            error = %aside.cause,
            "broker store is damaged: set aside (not deleted); starting without the retained messages and sessions it held"
        );
    }
    Ok(opened.conn)
}

/// Reads everything back, dropping expired messages (from the file too).
pub fn load(conn: &Connection) -> Result<Loaded, LoadError> {
    let now_ms = unix_ms(SystemTime::now());
    conn.execute(
        "DELETE FROM retained WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
        params![now_ms],
    )?;
    conn.execute(
        "DELETE FROM deliveries WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
        params![now_ms],
    )?;
    // Rows of sessions that are gone (never written that way, but cheap to be sure of).
    conn.execute_batch(
        "DELETE FROM deliveries WHERE session NOT IN (SELECT id FROM sessions);
         DELETE FROM subscriptions WHERE session NOT IN (SELECT id FROM sessions);
         DELETE FROM incoming_qos2 WHERE session NOT IN (SELECT id FROM sessions);",
    )?;

    let mut loaded = Loaded::default();
    let mut stmt = conn.prepare("SELECT topic, publish, expires_ms, crc FROM retained")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, Option<i64>>(3)?,
        ))
    })?;
    for row in rows {
        let (topic, blob, expires, crc) = row?;
        verify(&blob, crc, || format!("retained message on {topic}"))?;
        if let Some(m) = decode_publish(&blob, expires, now_ms, &topic) {
            loaded.retained.push(Arc::new(m));
        }
    }

    let mut by_id = std::collections::HashMap::new();
    let mut stmt = conn.prepare("SELECT id, client_id, protocol, expiry FROM sessions")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (id, client_id, protocol, expiry) = row?;
        let protocol = match protocol {
            3 => Protocol::V3_1,
            4 => Protocol::V3_1_1,
            _ => Protocol::V5,
        };
        let Ok(id) = u32::try_from(id) else { continue };
        loaded.max_session_id = loaded.max_session_id.max(id);
        by_id.insert(id, loaded.sessions.len());
        loaded.sessions.push(LoadedSession {
            id,
            client_id,
            protocol,
            expiry: u32::try_from(expiry).unwrap_or(u32::MAX),
            subs: Vec::new(),
            deliveries: Vec::new(),
            incoming_qos2: Vec::new(),
        });
    }

    let mut stmt = conn.prepare(
        "SELECT session, filter, qos, no_local, retain_as_pub, retain_handling, sub_id
         FROM subscriptions",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, bool>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<i64>>(6)?,
        ))
    })?;
    for row in rows {
        let (session, filter, qos, no_local, rap, rh, sub_id) = row?;
        let Some(&i) = u32::try_from(session).ok().and_then(|s| by_id.get(&s)) else {
            continue;
        };
        let valid = match outpost_mqtt::topic::parse_shared(&filter) {
            Some((_, inner)) => outpost_mqtt::topic::validate_topic_filter(inner).is_ok(),
            None => outpost_mqtt::topic::validate_topic_filter(&filter).is_ok(),
        };
        let Some(qos) = u8::try_from(qos).ok().and_then(QoS::from_u8) else {
            continue;
        };
        if !valid {
            warn!(filter = %filter, "broker store: skipping a stored subscription with an invalid filter");
            continue;
        }
        let retain_handling = match rh {
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => RetainHandling::SendAtSubscribe,
        };
        let options = SubscriptionOptions {
            qos,
            no_local,
            retain_as_published: rap,
            retain_handling,
        };
        let sub_id = sub_id.and_then(|v| u32::try_from(v).ok());
        loaded.sessions[i].subs.push((filter, options, sub_id));
    }

    let mut stmt = conn.prepare(
        "SELECT id, session, publish, expires_ms, sub_ids, packet_id, released, crc, message,
                qos, retain
         FROM deliveries ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?),
            (r.get::<_, Vec<u8>>(2)?, r.get::<_, Option<i64>>(3)?),
            r.get::<_, Option<Vec<u8>>>(4)?,
            (r.get::<_, Option<i64>>(5)?, r.get::<_, bool>(6)?),
            (r.get::<_, Option<i64>>(7)?, r.get::<_, Option<i64>>(8)?),
            (r.get::<_, Option<i64>>(9)?, r.get::<_, Option<bool>>(10)?),
        ))
    })?;
    // A message shared by many sessions is read, checked and decoded once, and shared in
    // memory as it was on disk.
    let mut shared: std::collections::HashMap<i64, Option<Arc<Message>>> = Default::default();
    let mut fetch = conn.prepare("SELECT publish, crc FROM messages WHERE id = ?1")?;
    for row in rows {
        let (
            (id, session),
            (blob, expires),
            sub_ids,
            (packet_id, released),
            (crc, message),
            (qos, retain),
        ) = row?;
        let id = u64::try_from(id).unwrap_or(0);
        loaded.max_delivery_id = loaded.max_delivery_id.max(id);
        let Some(&i) = u32::try_from(session).ok().and_then(|s| by_id.get(&s)) else {
            continue;
        };
        let msg = match message {
            Some(m) => {
                let cached = match shared.get(&m) {
                    Some(c) => c.clone(),
                    None => {
                        let (blob, crc): (Vec<u8>, i64) =
                            match fetch.query_row(params![m], |r| Ok((r.get(0)?, r.get(1)?))) {
                                Ok(v) => v,
                                Err(rusqlite::Error::QueryReturnedNoRows) => continue,
                                Err(e) => return Err(e.into()),
                            };
                        verify(&blob, Some(crc), || format!("message {m} owed to sessions"))?;
                        let decoded =
                            decode_publish(&blob, expires, now_ms, "shared message").map(Arc::new);
                        shared.insert(m, decoded.clone());
                        decoded
                    }
                };
                match cached {
                    Some(msg) => msg,
                    None => continue,
                }
            }
            None => {
                verify(&blob, crc, || format!("message {id} queued for a session"))?;
                match decode_publish(&blob, expires, now_ms, "delivery") {
                    Some(msg) => Arc::new(msg),
                    None => continue,
                }
            }
        };
        // A shared message is kept as published; each delivery has its own QoS and RETAIN.
        let qos = qos
            .and_then(|q| u8::try_from(q).ok())
            .and_then(QoS::from_u8)
            .unwrap_or(msg.qos);
        let retain = retain.unwrap_or(msg.retain);
        let sub_ids = sub_ids
            .unwrap_or_default()
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let packet_id = packet_id
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0);
        let d = Delivery {
            qos,
            retain,
            msg,
            sub_ids,
        };
        loaded.sessions[i]
            .deliveries
            .push((id, packet_id, released && packet_id.is_some(), d));
    }
    drop(fetch);

    let mut stmt = conn.prepare("SELECT session, packet_id FROM incoming_qos2")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (session, packet_id) = row?;
        if let (Some(&i), Ok(p)) = (
            u32::try_from(session).ok().and_then(|s| by_id.get(&s)),
            u16::try_from(packet_id),
        ) {
            loaded.sessions[i].incoming_qos2.push(p);
        }
    }
    // Also a floor for new ids: a delivery id must never be reused for a row that a
    // crash left behind.
    let max: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM deliveries", [], |r| {
        r.get(0)
    })?;
    loaded.max_delivery_id = loaded.max_delivery_id.max(u64::try_from(max).unwrap_or(0));
    Ok(loaded)
}
