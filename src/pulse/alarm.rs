//! Broker resource alarms: a broker low on memory or disk blocks every
//! connection that publishes (`connection.blocked`) until the alarm clears,
//! cluster-wide; consumers go on. This file owns seeing that: a [`Watch`]
//! on one connection (is it blocked, and the broker's reason), the probe
//! that lets a connection learn of an alarm without publishing a
//! notification, and [`watch`], `serve`'s thread that keeps `/health` told.
//!
//! The probe is a message to the default exchange with a routing key no
//! queue can have, which the broker drops. Measured on RabbitMQ 3.10: the
//! broker sends `connection.blocked` only to a connection that publishes,
//! within milliseconds of its first publish under an alarm; an idle or a
//! consuming connection hears nothing. A blocked connection must never be
//! closed or replaced: lapin writes nothing on it, not even its close, so
//! the broker would keep each replaced one open until the alarm clears.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_lite::future::{self, block_on};
use futures_lite::{Stream, StreamExt};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ConnectionStatus, Event};
use log::{debug, info, warn};

use super::{BrokerError, Nodes, wait};
use crate::config::AmqpNodes;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::shutdown::Shutdown;

/// Queue names starting with `amq.` are the broker's own: no client can
/// declare one, so a probe published with this key reaches no queue.
const PROBE_KEY: &str = "amq.bzpush.alarm-probe";
/// Time between two probes on one connection: an alarm is seen within
/// about this long, at the cost of one dropped message each.
pub const PROBE_EVERY: Duration = Duration::from_secs(3);
/// How often a wait checks whether its connection got blocked.
const BLOCKED_CHECK: Duration = Duration::from_millis(100);
/// How often the alarm watch looks whether the consumers are connected.
const CONSUMERS_CHECK: Duration = Duration::from_millis(500);

/// What the broker says of one connection's publishing.
pub struct Watch {
    status: ConnectionStatus,
    events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    /// The broker's reason for the last block.
    reason: Option<String>,
    /// A channel of its own, without confirms, for probes; `None` once the
    /// broker refused one (the user may not write to the default
    /// exchange): the alarm then shows at the next real publish.
    probe: Option<Channel>,
    probed: Option<Instant>,
}

impl Watch {
    /// Watches `connection`, probing on `probe` (a channel of it).
    pub fn new(connection: &lapin::Connection, probe: Option<Channel>) -> Watch {
        Watch {
            status: connection.status().clone(),
            // Events reach only listeners that exist when they happen: this
            // one is made before anything is published.
            events: Box::pin(connection.events_listener()),
            reason: None,
            probe,
            probed: None,
        }
    }

    /// The broker's reason if it blocks the connection now.
    pub fn blocked(&mut self) -> Option<String> {
        while let Some(Some(event)) = block_on(future::poll_once(self.events.next())) {
            if let Event::ConnectionBlocked(reason) = event {
                self.reason = Some(reason);
            }
        }
        self.status.blocked().then(|| {
            self.reason
                .clone()
                .unwrap_or_else(|| "the broker gave no reason".to_string())
        })
    }

    /// Publishes a probe unless one went out within [`PROBE_EVERY`] or the
    /// connection is blocked already; the broker answers a probe under an
    /// alarm by blocking the connection, which [`Watch::blocked`] then sees.
    pub fn probe(&mut self) {
        if self.probed.is_some_and(|at| at.elapsed() < PROBE_EVERY) || self.status.blocked() {
            return;
        }
        let Some(channel) = &self.probe else {
            return;
        };
        self.probed = Some(Instant::now());
        if !channel.status().connected() {
            debug!(
                "the broker closed the alarm probe's channel (may this user write to the \
                 default exchange?): an alarm shows at the next publish only"
            );
            self.probe = None;
            return;
        }
        let publish = channel.basic_publish(
            "".into(),
            PROBE_KEY.into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default(),
        );
        // Written at once unless the connection is blocked meanwhile; the
        // message is dropped by the broker either way.
        let _ = block_on(future::or(async { publish.await.map(drop) }, async {
            async_io::Timer::after(BLOCKED_CHECK).await;
            Ok(())
        }));
    }

    /// Resolves once the connection is blocked: to race a wait for the
    /// broker against an alarm.
    pub fn until_blocked(&self) -> impl Future<Output = ()> + use<> {
        let status = self.status.clone();
        async move {
            while !status.blocked() {
                async_io::Timer::after(BLOCKED_CHECK).await;
            }
        }
    }
}

/// A probe channel on `connection`, opened before anything is published:
/// opening one on a blocked connection would never end.
pub fn probe_channel(connection: &lapin::Connection) -> Result<Channel, BrokerError> {
    wait("opening a channel", connection.create_channel())
}

/// The sentence for a block, the same in the log, `/health` and `check`.
pub fn blocked_sentence(reason: &str) -> String {
    format!(
        "resource alarm: the broker blocks every publisher ({reason}) until it clears; \
         no notification goes through meanwhile, and none is lost. On a broker node: \
         `rabbitmq-diagnostics alarms`; free memory or disk there"
    )
}

/// `serve`'s alarm watch, until `shutdown`: a connection of its own to a
/// node of `nodes`, probed every [`PROBE_EVERY`]; `metrics.broker_alarm`
/// holds the alarm's sentence while there is one, for `/health`. A
/// consumer never publishes, so the broker would not tell it. It connects
/// only while every consumer is connected: while one is not, `/health`
/// says why, and the broker gets one client retrying, not two.
///
/// It also measures what `serve` owes ([`crate::freshness`]): each probe,
/// it reads how many messages wait ready in each of `queues` (by feed, the
/// freshness slot of the same index). A queue found empty has had all it
/// held handed on; one never found empty since some moment has owed its
/// consumer's clients since then, whatever the consumer says.
pub fn watch(nodes: AmqpNodes, queues: &[String], metrics: &Metrics, shutdown: &Shutdown) {
    let mut nodes = Nodes::new(nodes);
    let mut backoff = Backoff::default();
    let set = |alarm: Option<String>| {
        *metrics
            .broker_alarm
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = alarm;
    };
    while !shutdown.requested() {
        if !metrics.upstream_up() {
            if shutdown.sleep(CONSUMERS_CHECK) {
                break;
            }
            continue;
        }
        let watched = nodes
            .connect("bzpush serve alarm watch")
            .and_then(|connection| {
                let probe = probe_channel(&connection)?;
                let counting = probe_channel(&connection)?;
                Ok((Watch::new(&connection, Some(probe)), counting, connection))
            });
        let (mut watch, mut counting, connection) = match watched {
            Ok(watched) => watched,
            // The consumers say that the broker is down.
            Err(e) => {
                debug!("alarm watch: {e}");
                if backoff.wait(shutdown) {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        let node = nodes.describe();
        let mut alarm: Option<String> = None;
        // A blocked connection stays: it cannot be closed anyway, and it
        // is unblocked when the alarm clears.
        while connection.status().connected() {
            match (watch.blocked(), &alarm) {
                (Some(reason), None) => {
                    let sentence = blocked_sentence(&reason);
                    warn!("broker {node}: {sentence}");
                    set(Some(sentence));
                    alarm = Some(reason);
                }
                (None, Some(_)) => {
                    info!("broker {node}: the resource alarm cleared");
                    set(None);
                    alarm = None;
                }
                _ => {}
            }
            // Counted before the probe: a probe under an alarm blocks the
            // connection, and a count on it would wait out its time-out.
            match &alarm {
                Some(reason) => owed_while_blocked(queues, metrics, reason),
                None => count_ready(&connection, &mut counting, queues, metrics),
            }
            watch.probe();
            if shutdown.sleep(PROBE_EVERY) {
                return;
            }
        }
        set(None);
        nodes.lost();
    }
}

/// Reads each queue's ready messages on `channel` for the freshness
/// measure. A queue that cannot be read (gone until its consumer declares
/// it again; the broker then closes the channel, which is opened again) is
/// not measured, so its time owed grows: its consumer says why.
fn count_ready(
    connection: &lapin::Connection,
    channel: &mut Channel,
    queues: &[String],
    metrics: &Metrics,
) {
    let freshness = &metrics.freshness;
    for (slot, queue) in queues.iter().enumerate() {
        if !channel.status().connected() {
            match probe_channel(connection) {
                Ok(open) => *channel = open,
                Err(e) => return debug!("alarm watch: {e}"),
            }
        }
        let declared = wait(
            "counting a queue's messages",
            channel.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        );
        match declared.map(|q| q.message_count()) {
            // Empty now; credited until the next count, so that the lag
            // does not grow between two counts that each find it empty.
            Ok(0) => {
                freshness.handed_on_until(slot, Instant::now() + PROBE_EVERY);
                freshness.explain(slot, None);
            }
            Ok(ready) => freshness.explain(
                slot,
                Some(format!(
                    "{ready} messages wait ready in it, not taken by its consumer"
                )),
            ),
            Err(e) => debug!("alarm watch: {e}"),
        }
    }
}

/// Under an alarm nothing is published, and what waits in the queues is
/// not measured (a blocked connection answers nothing): the time owed
/// grows, naming the alarm.
fn owed_while_blocked(queues: &[String], metrics: &Metrics, reason: &str) {
    for slot in 0..queues.len() {
        metrics
            .freshness
            .explain(slot, Some(blocked_sentence(reason)));
    }
}
