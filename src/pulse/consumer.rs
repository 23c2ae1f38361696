//! The consumer: one exchange's messages, through a durable queue (a
//! quorum queue by default, which survives the loss of a minority of the
//! cluster's nodes), into the hub. A consumed message is acked only once
//! the hub holds it, and a message that is not a notification is logged,
//! acked and dropped, never redelivered in a loop. A lost node is replaced
//! by the next one of the cluster; `/health` learns which node each
//! consumer uses, or why it has none.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use futures_lite::future::{self, block_on};
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use log::warn;

use super::{
    ACK_TIMEOUT, BrokerError, Cause, LinkState, NOT_FOUND, Nodes, PRECONDITION_FAILED,
    declare_exchange, decode, wait, wait_at_most,
};
use crate::catchup::{self, Resumed};
use crate::config::{AmqpNodes, QueueType, ServeConfig};
use crate::hub::{Event, FeedId, HubSender};
use crate::metrics::{Metrics, Task};
use crate::notification::Moment;
use crate::retry::{Backoff, Link};
use crate::shutdown::Shutdown;

/// Unacked messages the broker may have in flight to one consumer: enough
/// to keep the pipe full, few enough to redeliver cheaply after a crash.
const PREFETCH: u16 = 1000;
/// How long a consumer waits for a message before it looks at shutdown.
const SHUTDOWN_CHECK: Duration = Duration::from_millis(500);

/// The durable queue a `serve` consumes `exchange` through.
pub fn queue_name(prefix: &str, exchange: &str) -> String {
    format!("{prefix}/{exchange}")
}

/// Declares a feed's queue as `serve` wants it: durable, of
/// `setup.queue_type`, expiring after `setup.expires` unused (quorum
/// queues take `x-expires` too: RabbitMQ 3.10 checked). A classic queue is
/// declared without `x-queue-type`, as before the setting existed, so that
/// the queues of earlier versions match. The broker refuses
/// (PRECONDITION_FAILED, and closes the channel) if the queue exists with
/// other arguments.
async fn declare_queue(channel: &Channel, setup: &ConsumerSetup) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    let expires = u32::try_from(setup.expires.as_millis()).unwrap_or(u32::MAX);
    arguments.insert("x-expires".into(), AMQPValue::LongUInt(expires));
    if setup.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
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
    connection: &lapin::Connection,
    vhost: &str,
    setup: &ConsumerSetup,
) -> Result<QueueState, BrokerError> {
    let channel = wait("opening a channel", connection.create_channel())?;
    let passive = declare_passively(&channel, &setup.queue, "looking for the queue");
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
            Ok(QueueState::Differs(queue_mismatch(vhost, setup, &e)))
        }
        Err(e) => Err(e),
    }
}

/// Says that `setup`'s queue exists with other arguments than configured
/// (the broker's refusal `error` says which: `x-expires` or
/// `x-queue-type`), and how to apply them.
fn queue_mismatch(vhost: &str, setup: &ConsumerSetup, error: &BrokerError) -> String {
    format!(
        "queue {:?} exists with other arguments than configured (BZPUSH_QUEUE_TYPE {}, \
         BZPUSH_QUEUE_EXPIRES {:?}): {error}. Consuming it as it is. To apply the settings, \
         stop every serve using this queue, run `rabbitmqctl delete_queue -p '{vhost}' '{}'` \
         (the messages waiting in it are lost), and start serve again; or set \
         BZPUSH_QUEUE_TYPE and BZPUSH_QUEUE_EXPIRES back to the queue's own",
        setup.queue,
        setup.queue_type.name(),
        setup.expires,
        setup.queue
    )
}

/// Where and how one feed consumes.
pub struct ConsumerSetup {
    pub feed: FeedId,
    pub exchange: String,
    pub queue: String,
    pub expires: Duration,
    pub queue_type: QueueType,
}

impl ConsumerSetup {
    /// How `serve` with `config` consumes its feed number `feed`.
    pub fn for_feed(config: &ServeConfig, feed: FeedId) -> ConsumerSetup {
        let exchange = config.feeds[feed].exchange.clone();
        ConsumerSetup {
            feed,
            queue: queue_name(&config.queue_prefix, &exchange),
            exchange,
            expires: config.queue_expires,
            queue_type: config.queue_type,
        }
    }
}

/// Consumes one feed's exchange into the hub until shutdown: a durable
/// queue bound with `#`, on a node of `nodes`, reconnecting with backoff
/// (to the next node after losing one). Whether it is connected, to which
/// node, or why not, goes to `metrics` (`upstream_links` and
/// `broker_links`, at the feed's index), for `/health`.
pub fn consume(
    nodes: &AmqpNodes,
    setup: &ConsumerSetup,
    hub: &HubSender,
    metrics: &Metrics,
    shutdown: &Shutdown,
) {
    let mut nodes = Nodes::new(nodes.clone());
    let target = |nodes: &Nodes| format!("{} queue {:?}", nodes.describe(), setup.queue);
    let mut link = Link::new("broker", target(&nodes));
    if let Some(up) = metrics.upstream_links.get(setup.feed) {
        link = link.reporting(up);
    }
    let report = |state: LinkState| {
        if let Some(link) = metrics.broker_links.get(setup.feed) {
            *link.lock().unwrap_or_else(|e| e.into_inner()) = state;
        }
    };
    let mut backoff = Backoff::default();
    let mut connected_before = false;
    // Whether the operator was told that the queue's arguments differ.
    let mut advised = false;
    let downstream = Downstream {
        hub,
        metrics,
        task: metrics.tasks.register(&format!("pulse-{}", setup.feed)),
    };
    while !shutdown.requested() {
        let result = consume_once(
            &mut nodes,
            setup,
            &downstream,
            shutdown,
            &mut advised,
            &mut |node: String| {
                link.retarget(format!("{node} queue {:?}", setup.queue));
                link.up();
                report(LinkState {
                    node: Some(node),
                    problem: None,
                });
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
                link.retarget(target(&nodes));
                link.down(&e);
                report(LinkState {
                    node: None,
                    problem: Some(format!("{}: {e}", nodes.describe())),
                });
                nodes.lost();
                if backoff.wait(shutdown) {
                    break;
                }
            }
        }
    }
}

/// Where a consumer's messages go, and who watches it: the hub, the
/// counters, and its entry for the watchdog (working while it connects or
/// hands a message on, not while it waits for one).
struct Downstream<'a> {
    hub: &'a HubSender,
    metrics: &'a Metrics,
    task: Task,
}

/// One connection's worth of consuming. `Ok` on shutdown or when the hub
/// is gone.
fn consume_once(
    nodes: &mut Nodes,
    setup: &ConsumerSetup,
    Downstream { hub, metrics, task }: &Downstream,
    shutdown: &Shutdown,
    advised: &mut bool,
    connected: &mut dyn FnMut(String),
) -> Result<(), BrokerError> {
    let connecting = task.working();
    let connection = nodes.connect("bzpush serve")?;
    let vhost = nodes
        .current()
        .map_or_else(|| "/".to_string(), |n| n.vhost());
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
                warn!("{}", queue_mismatch(&vhost, setup, &e));
                *advised = true;
            }
            let channel = wait("opening a channel", connection.create_channel())?;
            declare_passively(&channel, &setup.queue, "declaring the queue passively")?;
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
    connected(nodes.describe());
    drop(connecting);
    // Everything published from now on reaches this queue; what was
    // consumed before (by a predecessor, or before the queue existed) may
    // not: the cache vouches only for later changes.
    let at = Resumed::Host(Moment::from_system(SystemTime::now()));
    let feed = setup.feed;
    let resumed = catchup::Event::Resumed { feed, at };
    if hub.send(Event::CatchUp(resumed)).is_err() {
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
        let _working = task.working();
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
                let message = Event::Notify {
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

/// Declares `queue` passively: reads it as it is, changes nothing; fails
/// (and closes `channel`) if it does not exist.
fn declare_passively(
    channel: &lapin::Channel,
    queue: &str,
    doing: &'static str,
) -> Result<lapin::Queue, BrokerError> {
    wait(
        doing,
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
}
