//! Pulse: the AMQP side of bzpush.
//!
//! This file owns the wire format of `exchange/bugzilla/simple` messages,
//! byte for byte what Mozilla's `mozillapulse` `SimpleBugzillaPublisher`
//! sends, and the broker errors and time bounds both sides share. The
//! [`publisher`] delivers a batch with publisher confirms (the poller's
//! side); the [`consumer`] feeds one exchange's messages to the hub (the
//! server's side); both reach the broker through [`nodes`], the nodes of
//! one cluster, and [`alarm`] tells whether the broker blocks publishers.
//! Each is a file named for what it owns, so that the function [`consume`]
//! and its module do not share a name. lapin is async; this module drives
//! it from plain threads with `block_on`, and nothing here may block on one
//! of lapin's executor threads. Every broker operation is bounded in time:
//! lapin can leave one pending forever on a connection that died under it.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::future::{self, block_on};
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde::Serialize;
use time::OffsetDateTime;

use crate::notification::{BugId, ChangeTime, Notification};

pub mod alarm;
pub mod consumer;
pub mod nodes;
pub mod publisher;

pub use consumer::{ConsumerSetup, QueueState, consume, probe_queue, queue_name};
pub use nodes::Nodes;
pub use publisher::{PublishError, Publisher, PulseSink, Sent};

/// One broker link as `/health` shows it: the node it uses, or why it
/// has none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// The node in use, without its password.
    pub node: Option<String>,
    /// Why the link is down: the node, and what failed there.
    pub problem: Option<String>,
}

/// AMQP `delivery_mode` for a message the broker keeps on disk.
const PERSISTENT: u8 = 2;

/// The JSON body of a Pulse message: what mozillapulse sends.
#[derive(Serialize)]
struct Body<'a> {
    payload: Payload<'a>,
    #[serde(rename = "_meta")]
    meta: Meta<'a>,
}

#[derive(Serialize)]
struct Payload<'a> {
    id: u32,
    delta_ts: &'a str,
}

#[derive(Serialize)]
struct Meta<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    serializer: &'static str,
    sent: &'a str,
}

/// The routing key of a notification: the bug id in decimal.
pub fn routing_key(notification: &Notification) -> String {
    notification.bug.to_string()
}

/// The JSON body of a Pulse message for `notification`, sent at `sent`
/// (RFC 3339, see [`rfc3339_utc`]).
pub fn encode(notification: &Notification, exchange: &str, sent: &str) -> Vec<u8> {
    let routing_key = routing_key(notification);
    let message = Body {
        payload: Payload {
            id: notification.bug.get(),
            delta_ts: notification.when.as_str(),
        },
        meta: Meta {
            exchange,
            routing_key: &routing_key,
            serializer: "json",
            sent,
        },
    };
    serde_json::to_vec(&message).expect("a struct of numbers and strings always serializes")
}

/// Why a consumed message is not a notification.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Reads a Pulse message body: any JSON object with `payload.id` (a
/// positive integer or decimal string) and `payload.delta_ts` (a string,
/// kept verbatim). Everything else in it is ignored.
pub fn decode(body: &[u8]) -> Result<Notification, DecodeError> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| DecodeError("body is not JSON"))?;
    let payload = json.get("payload").ok_or(DecodeError("no payload"))?;
    let bug = payload
        .get("id")
        .and_then(BugId::from_json)
        .ok_or(DecodeError("payload.id is not a bug id"))?;
    let when = payload
        .get("delta_ts")
        .and_then(serde_json::Value::as_str)
        .ok_or(DecodeError("payload.delta_ts is not a string"))?;
    Ok(Notification {
        bug,
        when: ChangeTime::new(when),
    })
}

/// The AMQP properties every Pulse message carries.
pub fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(PERSISTENT)
}

/// `time` as `YYYY-MM-DDTHH:MM:SS+00:00`, the form of `_meta.sent`; the
/// epoch for a clock before it or beyond year 9999.
pub fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let t = i64::try_from(secs)
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Declares `exchange` as mozillapulse's publisher does: topic, durable,
/// not auto-deleted. Idempotent; fails if it exists with other flags.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
}

/// How long connecting or declaring may take. lapin can leave an operation
/// pending forever when the connection dies under it: an ack sent as a
/// severed connection closed was seen never to resolve (about one sever in
/// six, in a test publishing 1000 messages/s), leaving the consumer stuck
/// for good while `/health` said the broker was up and SIGTERM could not
/// stop it. So every broker operation is bounded; past its bound, the
/// connection counts as dead and is replaced.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ack may take: it only hands a frame to lapin's I/O thread,
/// so a stuck one means a dead connection. Short, because consuming waits
/// for it; a false alarm costs only a reconnect and redelivered duplicates.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long publishing a batch, confirms included, may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// A broker failure, with what was being done.
#[derive(Debug)]
pub struct BrokerError {
    doing: &'static str,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Lapin(lapin::Error),
    Closed,
    Lost,
    ConsumerEnded,
    TimedOut(Duration),
    /// `amqps://` to a port that answered in plain text.
    PlainText,
    /// No node of the cluster answered: each node and why.
    EveryNode(Vec<(String, BrokerError)>),
}

impl BrokerError {
    fn new(doing: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
        move |error| BrokerError {
            doing,
            cause: Cause::Lapin(error),
        }
    }

    /// Connecting to `node` failed with `error`. rustls reports a plain
    /// AMQP answer to its TLS hello as "received corrupt message", which
    /// says nothing of the cause: a TLS URL to a port without TLS.
    fn connecting(node: &crate::config::AmqpUrl, error: lapin::Error) -> BrokerError {
        let plain = node.tls()
            && matches!(error.kind(), lapin::ErrorKind::IOError(e)
                if e.kind() == std::io::ErrorKind::InvalidData);
        BrokerError {
            doing: "connecting",
            cause: if plain {
                Cause::PlainText
            } else {
                Cause::Lapin(error)
            },
        }
    }

    /// The broker answered and said no (credentials, vhost, permissions,
    /// an incompatible declaration): retrying as is will not help. For a
    /// cluster: every node said no.
    pub fn refused(&self) -> bool {
        match &self.cause {
            Cause::Lapin(e) => matches!(e.kind(), lapin::ErrorKind::ProtocolError(_)),
            Cause::PlainText => true,
            Cause::EveryNode(nodes) => nodes.iter().all(|(_, e)| e.refused()),
            _ => false,
        }
    }

    /// Whether the error's own text already says what to do (a refused
    /// login or vhost, TLS to a plain port), so that a caller adds no
    /// second piece of advice.
    pub fn advised(&self) -> bool {
        match &self.cause {
            Cause::PlainText => true,
            Cause::EveryNode(nodes) => nodes.iter().all(|(_, e)| e.advised()),
            _ => matches!(self.code(), Some(ACCESS_REFUSED | NOT_ALLOWED)),
        }
    }

    fn closed(doing: &'static str) -> BrokerError {
        BrokerError {
            doing,
            cause: Cause::Closed,
        }
    }

    fn lost(doing: &'static str) -> BrokerError {
        BrokerError {
            doing,
            cause: Cause::Lost,
        }
    }
}

impl BrokerError {
    /// The broker's AMQP reply code, if it refused the operation.
    fn code(&self) -> Option<u16> {
        match &self.cause {
            Cause::Lapin(e) => amqp_code(e),
            _ => None,
        }
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Lapin(e) => {
                write!(f, "{}: {}", self.doing, lapin_sentence(e))?;
                let todo = match amqp_code(e) {
                    Some(ACCESS_REFUSED) => " — check the user and password in BZPUSH_AMQP_URL",
                    Some(NOT_ALLOWED) => {
                        " — no such vhost, or the user may not use it: check the vhost in \
                         BZPUSH_AMQP_URL (the default vhost / is written %2f) and the user's \
                         permissions"
                    }
                    _ => "",
                };
                f.write_str(todo)
            }
            Cause::PlainText => write!(
                f,
                "{}: TLS failed: the port answered without TLS — an amqps:// URL points at a \
                 plain AMQP port (RabbitMQ listens for TLS on 5671 by default, plain on 5672): \
                 use amqp:// for this port, or the broker's TLS port",
                self.doing
            ),
            Cause::EveryNode(nodes) => {
                write!(f, "{}: no node answered", self.doing)?;
                for (node, error) in nodes {
                    // Each error starts with what was being done: said once.
                    let why = error.to_string();
                    let why = why
                        .strip_prefix(&format!("{}: ", self.doing))
                        .unwrap_or(&why)
                        .to_string();
                    write!(f, "; {node}: {why}")?;
                }
                Ok(())
            }
            Cause::Closed => write!(f, "{}: the broker closed the connection", self.doing),
            Cause::ConsumerEnded => write!(
                f,
                "{}: the broker ended the consumer (its queue was deleted, or the connection closed)",
                self.doing
            ),
            Cause::Lost => write!(
                f,
                "{}: the connection was lost (closed, or silent past the heartbeat)",
                self.doing
            ),
            Cause::TimedOut(after) => {
                write!(f, "{}: no answer within {after:?}", self.doing)
            }
        }
    }
}

impl std::error::Error for BrokerError {}

/// AMQP reply codes bzpush tells apart.
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;
const NOT_ALLOWED: u16 = 530;

/// The AMQP reply code of a refusal by the broker, if `error` is one.
fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.kind().get_id()),
        _ => None,
    }
}

/// A lapin error as a sentence: lapin prints connection and channel states
/// with `Debug` (`invalid connection state: Closed`), and the broker's
/// refusals with their AMQP class names first.
fn lapin_sentence(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::IOError(e) => format!("connection failed: {e}"),
        lapin::ErrorKind::ProtocolError(e) => {
            format!("the broker refused: {}", e.get_message())
        }
        lapin::ErrorKind::InvalidConnectionState(_) => "the connection is closed".to_string(),
        lapin::ErrorKind::InvalidChannelState(_, _) => "the channel is closed".to_string(),
        _ => error.to_string(),
    }
}

/// Runs `operation` to its end, or fails it with a [`BrokerError`] after
/// `timeout`: no broker operation may block a thread forever.
fn bounded<T, E: From<BrokerError>>(
    doing: &'static str,
    timeout: Duration,
    operation: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    block_on(future::or(operation, async {
        async_io::Timer::after(timeout).await;
        Err(BrokerError {
            doing,
            cause: Cause::TimedOut(timeout),
        }
        .into())
    }))
}

/// One lapin operation, bounded by [`OPERATION_TIMEOUT`].
pub(crate) fn wait<T>(
    doing: &'static str,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    wait_at_most(doing, OPERATION_TIMEOUT, operation)
}

/// One lapin operation, bounded by `timeout`.
pub(crate) fn wait_at_most<T>(
    doing: &'static str,
    timeout: Duration,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    bounded(doing, timeout, async {
        operation.await.map_err(BrokerError::new(doing))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::{BugId, ChangeTime};
    use std::time::Duration;

    #[test]
    fn body_is_what_mozillapulse_sends() {
        let n = Notification {
            bug: BugId::new(123456).expect("nonzero"),
            when: ChangeTime::new("2026-11-28T02:04:50"),
        };
        let body = encode(&n, "exchange/bugzilla/simple", "2026-11-28T02:04:51+00:00");
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            r#"{"payload":{"id":123456,"delta_ts":"2026-11-28T02:04:50"},"_meta":{"exchange":"exchange/bugzilla/simple","routing_key":"123456","serializer":"json","sent":"2026-11-28T02:04:51+00:00"}}"#
        );
    }

    #[test]
    fn decode_accepts_what_publishers_send_and_nothing_else() {
        let ok = |body: &str| decode(body.as_bytes()).map(|n| (n.bug.get(), n.when.to_string()));
        assert_eq!(
            ok(r#"{"payload":{"id":5,"delta_ts":"2026-11-28T02:04:50"}}"#),
            Ok((5, "2026-11-28T02:04:50".into()))
        );
        assert_eq!(
            ok(r#"{"payload":{"id":"5","delta_ts":"x"},"_meta":{}}"#),
            Ok((5, "x".into()))
        );
        for bad in [
            "",
            "null",
            "[]",
            r#"{"id":5}"#,
            r#"{"payload":{"id":5}}"#,
            r#"{"payload":{"id":0,"delta_ts":"x"}}"#,
            r#"{"payload":{"id":5,"delta_ts":7}}"#,
            r#"{"payload":{"id":"5x","delta_ts":"x"}}"#,
            "\u{0}",
        ] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(decode(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn a_broker_operation_that_never_ends_fails_after_its_bound() {
        let started = std::time::Instant::now();
        let result = wait_at_most(
            "acking",
            Duration::from_millis(50),
            future::pending::<lapin::Result<()>>(),
        );
        let error = result.expect_err("a pending operation times out");
        assert_eq!(error.to_string(), "acking: no answer within 50ms");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn sent_time_is_rfc3339_utc() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00+00:00");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_831_491);
        assert_eq!(rfc3339_utc(t), "2026-11-28T02:04:51+00:00");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_utc(leap), "2000-02-29T00:00:00+00:00");
    }
}
