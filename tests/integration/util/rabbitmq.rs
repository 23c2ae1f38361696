//! RabbitMQ for the tests: operations with a deadline, and an exchange of
//! each test's own with a queue whose messages the test reads.
//!
//! Shared with the benchmarks (see `basics.rs`): everything here is used
//! by both. What a test keeps of each message is the caller's choice
//! ([`Broker::consuming`]): the tests keep its properties and body, the
//! benchmarks the moment it arrived.

use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use futures_lite::StreamExt;
use futures_lite::future::{self, block_on};
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use super::unique;

pub const AMQP_ADDR: &str = "127.0.0.1:5672";

const START_RABBITMQ: &str = "RabbitMQ must answer at 127.0.0.1:5672 as guest/guest: run \
    `./test` once, which installs and starts it (or start it yourself: \
    `rabbitmq-server -detached && rabbitmqctl await_startup`)";

/// How long one broker operation may take before the test fails: lapin can
/// leave an operation pending forever on a connection that died under it
/// (see `src/pulse.rs`), and a test must then fail, not hang.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one lapin operation; fails the test, saying what it was doing, if
/// it errs or is still pending after [`BROKER_TIMEOUT`].
pub fn broker<T, E: std::fmt::Display>(
    doing: &str,
    operation: impl Future<Output = Result<T, E>>,
) -> T {
    broker_within(doing, BROKER_TIMEOUT, operation)
}

/// [`broker`] with a bound of its own, for an operation that takes long.
pub fn broker_within<T, E: std::fmt::Display>(
    doing: &str,
    timeout: Duration,
    operation: impl Future<Output = Result<T, E>>,
) -> T {
    match within(timeout, operation) {
        Some(Ok(value)) => value,
        Some(Err(e)) => panic!("{doing}: {e}"),
        None => panic!(
            "{doing}: no answer from the broker within {timeout:?}. A broker with a \
             disk or memory alarm blocks every publisher: `rabbitmq-diagnostics alarms`"
        ),
    }
}

/// `operation`'s outcome, or `None` if it is still pending after
/// `timeout`: for cleanup, which must neither panic nor hang.
pub fn within<T>(timeout: Duration, operation: impl Future<Output = T>) -> Option<T> {
    block_on(future::or(async { Some(operation.await) }, async {
        async_io::Timer::after(timeout).await;
        None
    }))
}

/// An exchange of its own (topic, durable, as the publisher declares it),
/// with an exclusive queue bound to `#` if the test has one, whose
/// messages arrive as `M`; the exchange is deleted at the end of the test.
pub struct Broker<M> {
    pub exchange: String,
    pub(super) connection: Connection,
    pub(super) received: Receiver<M>,
}

pub fn amqp_url_at(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// A connection to the test broker; fails the test saying how to start
/// RabbitMQ if it does not answer.
pub fn amqp_connect() -> Connection {
    let url = amqp_url_at(AMQP_ADDR);
    broker(
        START_RABBITMQ,
        Connection::connect(&url, ConnectionProperties::default()),
    )
}

/// Deletes `exchange` at the end of a test; gives up quietly, since a
/// leftover exchange harms no other test.
pub fn delete_exchange(connection: &Connection, exchange: &str) {
    if let Some(Ok(channel)) = within(BROKER_TIMEOUT, connection.create_channel()) {
        let delete = channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default());
        let _ = within(BROKER_TIMEOUT, delete);
    }
}

impl<M: Send + 'static> Broker<M> {
    /// An exchange and its queue, consumed on a thread of its own: `keep`
    /// turns each delivery, as it arrives, into what [`Broker::recv`]
    /// returns.
    pub fn consuming(keep: fn(Delivery) -> M) -> Broker<M> {
        let (mut test_broker, channel, queue) = Broker::with_queue();
        test_broker.received = consume(&channel, &queue, keep);
        test_broker
    }
}

/// Consumes `queue` on `channel` on a thread of its own, which ends with
/// the channel: `keep` turns each delivery, as it arrives, into what the
/// receiver gets. The queue is the test's alone, so messages are taken as
/// delivered (no_ack): acking each one costs a hand-off to lapin's I/O
/// thread and a frame to the broker, which on a 2-core machine took more
/// CPU than the poller a benchmark measures.
pub fn consume<M: Send + 'static>(
    channel: &Channel,
    queue: &str,
    keep: impl Fn(Delivery) -> M + Send + 'static,
) -> Receiver<M> {
    let mut consumer = broker(
        "consume",
        channel.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    );
    let (tx, received) = crossbeam_channel::unbounded();
    thread::Builder::new()
        .name("test-consumer".into())
        .spawn(move || {
            while let Some(Ok(delivery)) = block_on(consumer.next()) {
                if tx.send(keep(delivery)).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the test consumer");
    received
}

impl<M> Broker<M> {
    /// An exchange and its exclusive queue, bound to `#`, that nobody
    /// consumes yet; the channel that declared them and the queue's name.
    /// [`Broker::recv`] is not for this one: its messages stay in the
    /// queue ([`Broker::ready_in`] counts them) unless the caller consumes
    /// them.
    pub fn with_queue() -> (Broker<M>, Channel, String) {
        let (exchange, connection, channel) = declare_exchange();
        let queue = broker(
            "declare the test queue",
            channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        );
        broker(
            "bind the test queue",
            channel.queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        );
        let queue = queue.name().to_string();
        let test_broker = Broker {
            exchange,
            connection,
            received: crossbeam_channel::never(),
        };
        (test_broker, channel, queue)
    }

    /// How many messages wait in `queue`, ready for a consumer (delivered
    /// but unacked ones not counted).
    pub fn ready_in(&self, queue: &str) -> u32 {
        let channel = broker("open a channel", self.connection.create_channel());
        let declared = broker(
            "count the test queue",
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        );
        let _ = within(BROKER_TIMEOUT, channel.close(200, "counted".into()));
        declared.message_count()
    }

    /// The next message, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<M> {
        match self.received.recv_timeout(timeout) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the test consumer stopped"),
        }
    }
}

/// A uniquely named exchange, declared as the publisher declares it; the
/// connection and channel that declared it.
pub fn declare_exchange() -> (String, Connection, Channel) {
    let exchange = unique("bzpush.test");
    let connection = amqp_connect();
    let channel = broker("open a channel", connection.create_channel());
    broker(
        "declare the test exchange",
        bzpush::pulse::declare_exchange(&channel, &exchange),
    );
    (exchange, connection, channel)
}

impl<M> Drop for Broker<M> {
    fn drop(&mut self) {
        delete_exchange(&self.connection, &self.exchange);
        let _ = within(
            BROKER_TIMEOUT,
            self.connection.close(200, "test done".into()),
        );
    }
}
