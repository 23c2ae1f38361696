//! The publisher: a batch of notifications to one exchange, with publisher
//! confirms. A batch counts as published only when the broker has acked
//! every message in it; callers must not forget a change before
//! [`Publisher::publish`] returns `Ok`. [`PulseSink`] is the poller's
//! [`Sink`] built on it.

use std::fmt;
use std::time::SystemTime;

use futures_lite::future;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, ConnectionProperties, PublisherConfirm};

use super::{
    BrokerError, OPERATION_TIMEOUT, PUBLISH_TIMEOUT, bounded, declare_exchange, encode, properties,
    rfc3339_utc, routing_key,
};
use crate::config::AmqpUrl;
use crate::notification::{BugId, Notification};
use crate::poller::Sink;

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
    connection: lapin::Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    /// Connects, declares `exchange` the way mozillapulse does (topic,
    /// durable) and turns on publisher confirms.
    pub fn connect(url: &AmqpUrl, exchange: &str, name: &str) -> Result<Publisher, BrokerError> {
        bounded("connecting", OPERATION_TIMEOUT, async {
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let connection = lapin::Connection::connect(url.secret(), properties)
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
