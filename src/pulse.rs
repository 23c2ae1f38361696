//! Pulse: the AMQP side of bzpush.
//!
//! Owns the wire format of `exchange/bugzilla/simple` messages, byte for
//! byte what Mozilla's `mozillapulse` `SimpleBugzillaPublisher` sends; the
//! [`Publisher`] that delivers a batch with publisher confirms; and the
//! [`consume`] loop that feeds one exchange's messages to the hub. A batch
//! counts as published only when the broker has acked every message in it;
//! callers must not forget a change before [`Publisher::publish`] returns
//! `Ok`. A consumed message is acked only once the hub holds it, and a
//! message that is not a notification is logged, acked and dropped, never
//! redelivered in a loop. lapin is async; this module drives it from plain
//! threads with `block_on`, and nothing here may block on one of lapin's
//! executor threads. Every broker operation is bounded in time: lapin can
//! leave one pending forever on a connection that died under it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use futures_lite::future::{self, block_on};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use log::warn;
use serde::Serialize;

use crate::config::AmqpUrl;
use crate::hub::{FeedId, HubSender, Message as HubMessage};
use crate::metrics::Metrics;
use crate::notification::{BugId, ChangeTime, Notification};
use crate::poller::Sink;
use crate::retry::{Backoff, Link};
use crate::shutdown::Shutdown;

/// AMQP `delivery_mode` for a message the broker keeps on disk.
const PERSISTENT: u8 = 2;

#[derive(Serialize)]
struct Message<'a> {
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
    let message = Message {
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

/// `time` as `YYYY-MM-DDTHH:MM:SS+00:00`, the form of `_meta.sent`.
pub fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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
}

impl BrokerError {
    fn new(doing: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
        move |error| BrokerError {
            doing,
            cause: Cause::Lapin(error),
        }
    }

    /// The broker answered and said no (credentials, vhost, permissions,
    /// an incompatible declaration): retrying as is will not help.
    pub fn refused(&self) -> bool {
        matches!(&self.cause, Cause::Lapin(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(_)))
    }

    /// Whether the error's own text already says what to do (a refused
    /// login or vhost), so that a caller adds no second piece of advice.
    pub fn advised(&self) -> bool {
        matches!(self.code(), Some(ACCESS_REFUSED | NOT_ALLOWED))
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
                        " — the user may not use that vhost: check BZPUSH_AMQP_URL and the user's permissions"
                    }
                    _ => "",
                };
                f.write_str(todo)
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
fn wait_at_most<T>(
    doing: &'static str,
    timeout: Duration,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    bounded(doing, timeout, async {
        operation.await.map_err(BrokerError::new(doing))
    })
}

/// Why a batch did not count as published.
#[derive(Debug)]
pub enum PublishError {
    /// The connection or channel failed; reconnect and publish again.
    Broker(BrokerError),
    /// The broker refused (nacked) a message; the batch must be retried.
    Nacked { bug: String },
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Broker(e) => e.fmt(f),
            PublishError::Nacked { bug } => {
                write!(f, "the broker refused (nacked) the message for bug {bug}")
            }
        }
    }
}

impl std::error::Error for PublishError {}

impl From<BrokerError> for PublishError {
    fn from(e: BrokerError) -> PublishError {
        PublishError::Broker(e)
    }
}

/// A confirmed-publish channel to one exchange.
pub struct Publisher {
    // Held to keep the connection open (lapin closes it when the connection
    // and all its channels are dropped) and to read its state.
    connection: Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    /// Connects, declares `exchange` the way mozillapulse does (topic,
    /// durable) and turns on publisher confirms.
    pub fn connect(url: &AmqpUrl, exchange: &str, name: &str) -> Result<Publisher, BrokerError> {
        bounded("connecting", OPERATION_TIMEOUT, async {
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let connection = Connection::connect(url.secret(), properties)
                .await
                .map_err(BrokerError::new("connecting"))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(BrokerError::new("opening a channel"))?;
            declare_exchange(&channel, exchange)
                .await
                .map_err(BrokerError::new("declaring the exchange"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(BrokerError::new("enabling publisher confirms"))?;
            Ok(Publisher {
                connection,
                channel,
                exchange: exchange.to_string(),
            })
        })
    }

    /// Whether the connection and channel are still open, as lapin last
    /// knew: a link cut, closed by the broker, or silent past the
    /// heartbeat is not.
    pub fn is_open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Publishes every notification, then waits until the broker has
    /// confirmed them all. `Ok` means every message is the broker's.
    pub fn publish(&self, batch: &[Notification]) -> Result<(), PublishError> {
        let sent = self.send(batch)?;
        self.confirm(sent)
    }

    /// Puts every notification of `batch` on the wire, in order after any
    /// batch sent before, without waiting for the broker's confirms: the
    /// caller gets them from [`Publisher::confirm`].
    pub fn send(&self, batch: &[Notification]) -> Result<Sent, PublishError> {
        let sent = rfc3339_utc(SystemTime::now());
        let bodies: Vec<Vec<u8>> = batch
            .iter()
            .map(|n| encode(n, &self.exchange, &sent))
            .collect();
        bounded("publishing", PUBLISH_TIMEOUT, async {
            // Queue the whole batch before waiting for anything. lapin's
            // `basic_publish` queues a message's frames when first polled,
            // then waits for its I/O thread to write them: polling every
            // send once, in batch order, queues the batch in order, and the
            // writes are awaited together. Awaiting each send before
            // starting the next costs a hand-off to the I/O thread per
            // message (measured ~115 µs: most of a 1000-row batch's time).
            let mut sends: Vec<_> = batch
                .iter()
                .zip(&bodies)
                .map(|(notification, body)| {
                    Box::pin(self.channel.basic_publish(
                        self.exchange.as_str().into(),
                        routing_key(notification).into(),
                        BasicPublishOptions::default(),
                        body,
                        properties(),
                    ))
                })
                .collect();
            let mut queued = Vec::with_capacity(sends.len());
            for send in &mut sends {
                queued.push(future::poll_once(send.as_mut()).await);
            }
            let mut confirms = Vec::with_capacity(batch.len());
            for ((notification, send), queued) in batch.iter().zip(&mut sends).zip(queued) {
                let confirm = match queued {
                    Some(done) => done,
                    None => send.as_mut().await,
                }
                .map_err(BrokerError::new("publishing"))?;
                confirms.push((notification.bug, confirm));
            }
            Ok(Sent(confirms))
        })
    }

    /// Waits until the broker has confirmed every message of `sent`. `Ok`
    /// means every one is the broker's.
    pub fn confirm(&self, Sent(confirms): Sent) -> Result<(), PublishError> {
        bounded("waiting for confirms", PUBLISH_TIMEOUT, async {
            for (bug, confirm) in confirms {
                match confirm
                    .await
                    .map_err(BrokerError::new("waiting for confirms"))?
                {
                    Confirmation::Ack(_) => {}
                    Confirmation::Nack(_) | Confirmation::NotRequested => {
                        return Err(PublishError::Nacked {
                            bug: bug.to_string(),
                        });
                    }
                }
            }
            Ok(())
        })
    }
}

/// A batch on the wire, its confirms still to come.
pub struct Sent(Vec<(BugId, PublisherConfirm)>);

/// The broker as the poller's [`Sink`]: connects (and declares the
/// exchange) at the first poll, and again after any failure, even when
/// there is nothing to publish: a Pulse consumer, which declares the
/// exchange passively, can bind before the first change, and a wrong
/// password or an outage shows in the log while idle.
pub struct PulseSink {
    url: AmqpUrl,
    exchange: String,
    publisher: Option<Publisher>,
}

impl PulseSink {
    pub fn new(url: AmqpUrl, exchange: String) -> PulseSink {
        PulseSink {
            url,
            exchange,
            publisher: None,
        }
    }
}

impl Sink for PulseSink {
    type Error = PublishError;
    type Pending = Sent;

    fn describe(&self) -> (&'static str, String) {
        ("broker", self.url.to_string())
    }

    fn send(&mut self, batch: &[Notification]) -> Result<Sent, PublishError> {
        let publisher = match self.publisher.take() {
            Some(p) => p,
            None => Publisher::connect(&self.url, &self.exchange, "bzpush poll")?,
        };
        // A failed publisher is dropped: the next batch reconnects.
        let sent = publisher.send(batch)?;
        self.publisher = Some(publisher);
        Ok(sent)
    }

    fn settle(&mut self, sent: Sent) -> Result<(), PublishError> {
        // Its confirms can only come on the connection it was sent on.
        let publisher = self
            .publisher
            .take()
            .ok_or_else(|| PublishError::Broker(BrokerError::closed("waiting for confirms")))?;
        publisher.confirm(sent)?;
        self.publisher = Some(publisher);
        Ok(())
    }

    fn idle(&mut self) -> Result<(), PublishError> {
        match self.publisher.take() {
            Some(p) if p.is_open() => self.publisher = Some(p),
            // Dropped: the next poll reconnects, after the poller's backoff.
            Some(_) => return Err(BrokerError::lost("waiting for changes").into()),
            None => {
                self.publisher = Some(Publisher::connect(
                    &self.url,
                    &self.exchange,
                    "bzpush poll",
                )?)
            }
        }
        Ok(())
    }
}

/// Unacked messages the broker may have in flight to one consumer: enough
/// to keep the pipe full, few enough to redeliver cheaply after a crash.
const PREFETCH: u16 = 1000;
/// How long a consumer waits for a message before it looks at shutdown.
const SHUTDOWN_CHECK: Duration = Duration::from_millis(500);

/// The durable queue a `serve` consumes `exchange` through.
pub fn queue_name(prefix: &str, exchange: &str) -> String {
    format!("{prefix}/{exchange}")
}

/// Declares a feed's queue as `serve` wants it: durable, expiring after
/// `setup.expires` unused. The broker refuses (PRECONDITION_FAILED, and
/// closes the channel) if the queue exists with other arguments.
async fn declare_queue(channel: &Channel, setup: &ConsumerSetup) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    let expires = u32::try_from(setup.expires.as_millis()).unwrap_or(u32::MAX);
    arguments.insert("x-expires".into(), AMQPValue::LongUInt(expires));
    channel
        .queue_declare(
            setup.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map(drop)
}

/// What a feed's queue looks like next to the configuration.
pub enum QueueState {
    /// Not there: `serve` creates it.
    Missing,
    /// There, with the configured arguments.
    Matches,
    /// There, with other arguments: `serve` consumes it as it is. The
    /// text says what differs and how to apply the configuration.
    Differs(String),
}

/// Looks at a feed's queue without changing anything: a passive declare
/// (is it there?), then, on a channel of its own, a declare with the
/// configured arguments, which changes nothing if they are equivalent and
/// is refused if not. A queue deleted in between is created as `serve`
/// would create it.
pub fn probe_queue(
    connection: &Connection,
    url: &AmqpUrl,
    setup: &ConsumerSetup,
) -> Result<QueueState, BrokerError> {
    let channel = wait("opening a channel", connection.create_channel())?;
    let passive = wait(
        "looking for the queue",
        channel.queue_declare(
            setup.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    );
    match passive {
        Ok(_) => {
            let _ = wait("closing a channel", channel.close(200, "probed".into()));
        }
        Err(e) if e.code() == Some(NOT_FOUND) => return Ok(QueueState::Missing),
        Err(e) => return Err(e),
    }
    let channel = wait("opening a channel", connection.create_channel())?;
    match wait("declaring the queue", declare_queue(&channel, setup)) {
        Ok(()) => {
            let _ = wait("closing a channel", channel.close(200, "probed".into()));
            Ok(QueueState::Matches)
        }
        Err(e) if e.code() == Some(PRECONDITION_FAILED) => {
            Ok(QueueState::Differs(queue_mismatch(url, setup, &e)))
        }
        Err(e) => Err(e),
    }
}

/// Says that `setup`'s queue exists with other arguments than configured
/// (the broker's refusal `error` says which), and how to apply them.
fn queue_mismatch(url: &AmqpUrl, setup: &ConsumerSetup, error: &BrokerError) -> String {
    let vhost = url
        .secret()
        .parse::<lapin::uri::AMQPUri>()
        .map_or_else(|_| "/".to_string(), |uri| uri.vhost);
    format!(
        "queue {:?} exists with other arguments than configured (BZPUSH_QUEUE_EXPIRES {:?}): \
         {error}. Consuming it as it is. To apply the setting, stop every serve using \
         this queue, run `rabbitmqctl delete_queue -p '{vhost}' '{}'` (the messages waiting \
         in it are lost), and start serve again; or set BZPUSH_QUEUE_EXPIRES back to \
         the queue's value",
        setup.queue, setup.expires, setup.queue
    )
}

/// Where and how one feed consumes.
pub struct ConsumerSetup {
    pub feed: FeedId,
    pub exchange: String,
    pub queue: String,
    pub expires: Duration,
}

/// Consumes one feed's exchange into the hub until shutdown: a durable
/// queue bound with `#`, reconnecting with backoff. `up` reports whether
/// this consumer is connected, for `/health`.
pub fn consume(
    url: &AmqpUrl,
    setup: &ConsumerSetup,
    hub: &HubSender,
    metrics: &Metrics,
    up: &AtomicBool,
    shutdown: &Shutdown,
) {
    let mut link = Link::new("broker", format!("{url} queue {:?}", setup.queue)).reporting(up);
    let mut backoff = Backoff::default();
    let mut connected_before = false;
    // Whether the operator was told that the queue's arguments differ.
    let mut advised = false;
    while !shutdown.requested() {
        let result = consume_once(
            url,
            setup,
            hub,
            metrics,
            shutdown,
            &mut advised,
            &mut || {
                link.up();
                // The next outage starts over from a short pause.
                backoff.reset();
                if connected_before {
                    metrics.broker_reconnects.fetch_add(1, Ordering::Relaxed);
                }
                connected_before = true;
            },
        );
        match result {
            Ok(()) => break,
            Err(e) => {
                link.down(&e);
                if backoff.wait(shutdown) {
                    break;
                }
            }
        }
    }
}

/// One connection's worth of consuming. `Ok` on shutdown or when the hub
/// is gone.
fn consume_once(
    url: &AmqpUrl,
    setup: &ConsumerSetup,
    hub: &HubSender,
    metrics: &Metrics,
    shutdown: &Shutdown,
    advised: &mut bool,
    connected: &mut dyn FnMut(),
) -> Result<(), BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name("bzpush serve".into());
    let connection = wait("connecting", Connection::connect(url.secret(), properties))?;
    let channel = wait("opening a channel", connection.create_channel())?;
    // Declared as the publisher declares it, so serve may start first.
    wait(
        "declaring the exchange",
        declare_exchange(&channel, &setup.exchange),
    )?;
    let channel = match wait("declaring the queue", declare_queue(&channel, setup)) {
        Ok(()) => channel,
        // The queue exists with other arguments (BZPUSH_QUEUE_EXPIRES was
        // changed): the broker refused and closed the channel. Consuming
        // the queue as it is beats consuming nothing; the operator is told
        // once how to apply the new value.
        Err(e) if e.code() == Some(PRECONDITION_FAILED) => {
            if !*advised {
                warn!("{}", queue_mismatch(url, setup, &e));
                *advised = true;
            }
            let channel = wait("opening a channel", connection.create_channel())?;
            wait(
                "declaring the queue passively",
                channel.queue_declare(
                    setup.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )?;
            channel
        }
        Err(e) => return Err(e),
    };
    wait(
        "binding the queue",
        channel.queue_bind(
            setup.queue.as_str().into(),
            setup.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )?;
    wait(
        "setting the prefetch window",
        channel.basic_qos(PREFETCH, BasicQosOptions::default()),
    )?;
    let mut consumer = wait(
        "starting the consumer",
        channel.basic_consume(
            setup.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )?;
    connected();
    // Everything published from now on reaches this queue; what was
    // consumed before (by a predecessor, or before the queue existed) may
    // not: the cache vouches only for later changes.
    if hub.send(HubMessage::Resumed { feed: setup.feed }).is_err() {
        return Ok(());
    }
    let mut acks = Acks::default();
    loop {
        // What is ready is taken without a timer; only an idle consumer
        // waits with one, after acking what the hub already holds.
        let next = match block_on(future::poll_once(consumer.next())) {
            Some(ready) => Some(ready),
            None => {
                acks.flush()?;
                block_on(future::or(async { Some(consumer.next().await) }, async {
                    async_io::Timer::after(SHUTDOWN_CHECK).await;
                    None
                }))
            }
        };
        if shutdown.requested() {
            return acks.flush();
        }
        let delivery = match next {
            None => continue,
            Some(None) => {
                return Err(BrokerError {
                    doing: "consuming",
                    cause: Cause::ConsumerEnded,
                });
            }
            Some(Some(delivery)) => delivery.map_err(BrokerError::new("consuming"))?,
        };
        metrics.notifications_in.fetch_add(1, Ordering::Relaxed);
        match decode(&delivery.data) {
            Ok(notification) => {
                let message = HubMessage::Notify {
                    feed: setup.feed,
                    notification,
                };
                if hub.send(message).is_err() {
                    return acks.flush();
                }
            }
            Err(e) => {
                metrics.poison_messages.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "dropping a message on {:?} (routing key {:?}): {e}",
                    setup.exchange,
                    delivery.routing_key.as_str()
                );
            }
        }
        // Acked only now that the hub holds it (or it was dropped).
        acks.handed_off(delivery.acker)?;
    }
}

/// Acks owed to the broker for deliveries the hub holds. One ack with
/// `multiple` covers every earlier delivery on the channel, so a busy
/// consumer acks once per [`ACK_EVERY`] messages instead of once per
/// message: each ack is a hand-off to lapin's I/O thread and a frame the
/// broker must handle, and in a flood those cost more than the delivery.
#[derive(Default)]
struct Acks {
    /// The latest delivery handed off and not yet acked.
    last: Option<lapin::Acker>,
    owed: usize,
}

/// Most deliveries a busy consumer leaves unacked: well inside
/// [`PREFETCH`], so the broker never stops sending for want of acks.
const ACK_EVERY: usize = 100;

impl Acks {
    fn handed_off(&mut self, acker: lapin::Acker) -> Result<(), BrokerError> {
        self.last = Some(acker);
        self.owed += 1;
        if self.owed >= ACK_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Acks every delivery handed off so far.
    fn flush(&mut self) -> Result<(), BrokerError> {
        self.owed = 0;
        match self.last.take() {
            Some(acker) => wait_at_most(
                "acking",
                ACK_TIMEOUT,
                acker.ack(BasicAckOptions { multiple: true }),
            )
            .map(drop),
            None => Ok(()),
        }
    }
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
