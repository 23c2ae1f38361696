//! The publisher: batches of notifications to one exchange, with publisher
//! confirms, and [`PulseSink`], the poller's [`Sink`] built on it. A
//! message is the broker's only once the broker acked it: confirming a
//! batch answers the messages the broker refused (nacked, because a queue
//! they were routed to refused them), which the poller keeps and sends
//! again; nobody may forget any other change of a batch before
//! [`Publisher::confirm`] returns `Ok`. A broker that blocks publishers (a
//! resource alarm) is said at once instead of waited out by a time-out,
//! and its connection is kept until the alarm clears ([`super::alarm`]).

use std::fmt;
use std::time::{Duration, SystemTime};

use futures_lite::future;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, PublisherConfirm};

use super::alarm::{Watch, blocked_sentence, probe_channel};
use super::nodes::{self, Nodes};
use super::{
    BrokerError, OPERATION_TIMEOUT, PUBLISH_TIMEOUT, bounded, declare_exchange, encode, properties,
    rfc3339_utc, routing_key,
};
use crate::config::{AmqpNodes, AmqpUrl};
use crate::notification::Notification;
use crate::poller::{Refused, Sink};

/// Why a batch, or a part of it, did not reach the broker.
#[derive(Debug)]
pub enum PublishError {
    /// The connection or channel failed; reconnect (to another node if
    /// need be) and publish again.
    Broker(BrokerError),
    /// The broker blocks publishing on this connection (a resource alarm):
    /// nothing is written until it clears. The text says so and what to do.
    Blocked(String),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Broker(e) => e.fmt(f),
            PublishError::Blocked(sentence) => f.write_str(sentence),
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
    connection: lapin::Connection,
    channel: Channel,
    exchange: String,
    watch: Watch,
}

impl Publisher {
    /// Connects to `url` as `name`, then as [`Publisher::open`].
    pub fn connect(url: &AmqpUrl, exchange: &str, name: &str) -> Result<Publisher, BrokerError> {
        Publisher::open(nodes::connect_to(url, name)?, exchange)
    }

    /// On `connection`: declares `exchange` the way mozillapulse does
    /// (topic, durable) and turns on publisher confirms.
    pub fn open(connection: lapin::Connection, exchange: &str) -> Result<Publisher, BrokerError> {
        let channel = bounded("opening a channel", OPERATION_TIMEOUT, async {
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
            Ok::<_, BrokerError>(channel)
        })?;
        let watch = Watch::new(&connection, Some(probe_channel(&connection)?));
        Ok(Publisher {
            connection,
            channel,
            exchange: exchange.to_string(),
            watch,
        })
    }

    /// Whether the connection and channel are still open, as lapin last
    /// knew: a link cut, closed by the broker, or silent past the
    /// heartbeat is not. A blocked one is.
    pub fn is_open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Publishes every notification, then waits until the broker has
    /// confirmed them all: `Ok` with the ones it refused (nacked); every
    /// other one is the broker's.
    pub fn publish(&mut self, batch: &[Notification]) -> Result<Vec<Notification>, PublishError> {
        let sent = self.send(batch)?;
        self.confirm(sent)
    }

    /// Puts every notification of `batch` on the wire, in order after any
    /// batch sent before, without waiting for the broker's confirms: the
    /// caller gets them from [`Publisher::confirm`]. A blocked connection
    /// takes nothing: `Err` at once.
    pub fn send(&mut self, batch: &[Notification]) -> Result<Sent, PublishError> {
        self.check_blocked()?;
        let sent = rfc3339_utc(SystemTime::now());
        let bodies: Vec<Vec<u8>> = batch
            .iter()
            .map(|n| encode(n, &self.exchange, &sent))
            .collect();
        let blocked = self.watch.until_blocked();
        let sent = bounded(
            "publishing",
            PUBLISH_TIMEOUT,
            future::or(
                async {
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
                        confirms.push((notification.clone(), confirm));
                    }
                    Ok(Sent(confirms))
                },
                when_blocked(blocked),
            ),
        );
        self.say_blocked(sent)
    }

    /// Waits until the broker has confirmed every message of `sent`: `Ok`
    /// with the ones it refused (nacked); every other one is the broker's.
    /// A connection blocked meanwhile fails it at once: what was not
    /// confirmed is sent again later, a duplicate at worst.
    pub fn confirm(&mut self, Sent(confirms): Sent) -> Result<Vec<Notification>, PublishError> {
        let blocked = self.watch.until_blocked();
        let refused = bounded(
            "waiting for confirms",
            PUBLISH_TIMEOUT,
            future::or(
                async {
                    let mut refused = Vec::new();
                    for (notification, confirm) in confirms {
                        match confirm
                            .await
                            .map_err(BrokerError::new("waiting for confirms"))?
                        {
                            Confirmation::Ack(_) => {}
                            Confirmation::Nack(_) | Confirmation::NotRequested => {
                                refused.push(notification)
                            }
                        }
                    }
                    Ok(refused)
                },
                when_blocked(blocked),
            ),
        );
        self.say_blocked(refused)
    }

    /// Probes for a resource alarm (at most every
    /// [`super::alarm::PROBE_EVERY`]): `Err` if the broker blocks this
    /// connection.
    pub fn check_alarm(&mut self) -> Result<(), PublishError> {
        self.watch.probe();
        self.check_blocked()
    }

    fn check_blocked(&mut self) -> Result<(), PublishError> {
        match self.watch.blocked() {
            Some(reason) => Err(PublishError::Blocked(blocked_sentence(&reason))),
            None => Ok(()),
        }
    }

    /// `result`, with the broker's reason in a block that ended a wait.
    fn say_blocked<T>(&mut self, result: Result<T, PublishError>) -> Result<T, PublishError> {
        match result {
            Err(PublishError::Blocked(_)) => {
                self.check_blocked()?;
                Err(PublishError::Blocked(blocked_sentence("no reason given")))
            }
            other => other,
        }
    }
}

/// Fails once `blocked` resolves: raced against a wait for the broker.
async fn when_blocked<T>(blocked: impl Future<Output = ()>) -> Result<T, PublishError> {
    blocked.await;
    Err(PublishError::Blocked(String::new()))
}

/// A batch on the wire, its confirms still to come.
pub struct Sent(Vec<(Notification, PublisherConfirm)>);

/// What the poller's connections are called on the broker.
const CONNECTION_NAME: &str = "bzpush poll";

/// The broker as the poller's [`Sink`]: connects (and declares the
/// exchange) at the first poll, and again after any failure, even when
/// there is nothing to publish: a Pulse consumer, which declares the
/// exchange passively, can bind before the first change, and a wrong
/// password, an outage or an alarm shows in the log while idle. A lost
/// node is replaced by the next one of the cluster.
pub struct PulseSink {
    nodes: Nodes,
    exchange: String,
    publisher: Option<Publisher>,
}

impl PulseSink {
    pub fn new(nodes: AmqpNodes, exchange: String) -> PulseSink {
        PulseSink {
            nodes: Nodes::new(nodes),
            exchange,
            publisher: None,
        }
    }

    /// Runs `work` on the publisher, connecting first if there is none. A
    /// connection that failed is dropped, and the next one goes to the
    /// next node; a blocked one is kept (it could not be closed anyway).
    fn with_publisher<T>(
        &mut self,
        work: impl FnOnce(&mut Publisher) -> Result<T, PublishError>,
    ) -> Result<T, PublishError> {
        let mut publisher = match self.publisher.take() {
            Some(publisher) => publisher,
            None => {
                let connection = self.nodes.connect(CONNECTION_NAME)?;
                Publisher::open(connection, &self.exchange).inspect_err(|_| self.nodes.lost())?
            }
        };
        let result = work(&mut publisher);
        match &result {
            Ok(_) => {
                self.nodes.answered();
                self.publisher = Some(publisher);
            }
            Err(PublishError::Blocked(_)) => self.publisher = Some(publisher),
            Err(PublishError::Broker(_)) => self.nodes.lost(),
        }
        result
    }
}

impl Sink for PulseSink {
    type Error = PublishError;
    type Pending = Sent;

    fn describe(&self) -> (&'static str, String) {
        ("broker", self.nodes.describe())
    }

    fn send(&mut self, batch: &[Notification]) -> Result<Sent, PublishError> {
        self.with_publisher(|publisher| publisher.send(batch))
    }

    fn settle(&mut self, sent: Sent) -> Result<Refused, PublishError> {
        // Its confirms can only come on the connection it was sent on.
        if self.publisher.is_none() {
            return Err(BrokerError::closed("waiting for confirms").into());
        }
        let changes = self.with_publisher(|publisher| publisher.confirm(sent))?;
        Ok(Refused {
            changes,
            why: format!(
                "a queue bound to exchange {:?} refused them (RabbitMQ refuses a message when \
                 any queue it is routed to does; every other queue has it): most often another \
                 consumer's queue that is full and set to x-overflow=reject-publish. Find it \
                 with `rabbitmqctl list_queues name messages arguments policy`; it needs a consumer, \
                 or a larger x-max-length",
                self.exchange
            ),
        })
    }

    fn idle(&mut self) -> Result<(), PublishError> {
        if self.publisher.as_ref().is_some_and(|p| !p.is_open()) {
            // Dropped: the next poll reconnects, after the poller's backoff.
            self.publisher = None;
            self.nodes.lost();
            return Err(BrokerError::lost("waiting for changes").into());
        }
        self.with_publisher(Publisher::check_alarm)
    }

    fn unreachable_for(&self) -> Option<Duration> {
        self.nodes.unreachable_for()
    }
}
