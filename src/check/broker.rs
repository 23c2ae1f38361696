//! `check`'s look at the broker: every node of the cluster, each
//! exchange declared as the publisher declares it, a resource alarm, and
//! serve's queues probed, never created.

use std::time::Duration;

use futures_lite::future;
use lapin::Connection;
use lapin::options::BasicQosOptions;

use crate::config::{AmqpNodes, AmqpUrl, ServeConfig, key};
use crate::pulse;
use crate::pulse::{ConsumerSetup, QueueState};

use super::Report;

/// Every node of the broker, a line each, then on the first that answers
/// (the others share its exchanges, queues and alarms): the `exchanges`,
/// and whether a resource alarm blocks publishers: a warning, as a lock on
/// a table is. It passes, no fault of the setup; `poll` holds its changes
/// until it clears, and failing would keep its unit (`check` is the
/// `ExecStartPre=`) from starting until then.
/// Answers a connection to that node, for the queues.
pub(super) fn check_broker(
    report: &mut Report,
    nodes: &AmqpNodes,
    exchanges: &[String],
    publishes: bool,
) -> Option<(Connection, AmqpUrl)> {
    let mut reachable: Option<(Connection, AmqpUrl)> = None;
    let mut failures = Vec::new();
    for node in nodes.nodes() {
        match pulse::nodes::connect_to(node, "bzpush check") {
            Ok(connection) => {
                report.line(Ok(format!("broker {node}: reachable")));
                match &reachable {
                    None => reachable = Some((connection, node.clone())),
                    Some(_) => close(connection),
                }
            }
            Err(e) => failures.push((node, e)),
        }
    }
    for (node, e) in failures {
        let todo = if e.advised() {
            ""
        } else if e.refused() {
            " — check the user, password and vhost in BZPUSH_AMQP_URL"
        } else {
            " — is RabbitMQ running and reachable at that host and port?"
        };
        let url = report.url(node, &key::AMQP_URL);
        match reachable {
            // A node down is what a cluster is for; that it is down is
            // still worth a line.
            Some(_) => report.warn(&format!(
                "broker {url}: {e}{todo} (bzpush uses the other nodes meanwhile)"
            )),
            None => report.line(Err(format!("broker {url}: {e}{todo}"))),
        }
    }
    let (connection, node) = reachable?;
    for exchange in exchanges {
        // A fresh channel each: a refused declaration closes its channel.
        let declared = pulse::wait("declaring the exchange", async {
            let channel = connection.create_channel().await?;
            pulse::declare_exchange(&channel, exchange).await
        });
        report.line(declared.map(|()| format!("exchange {exchange:?}: declarable (topic, durable)")).map_err(|e| {
            format!(
                "exchange {exchange:?}: {e} — an exchange of that name with another type or \
                 durability exists, or the user may not configure it"
            )
        }));
    }
    check_alarm(report, &node, publishes);
    Some((connection, node))
}

/// How long `check` waits for the broker's answer to its alarm probe.
const ALARM_PROBE_WAIT: Duration = Duration::from_secs(5);

/// Whether a resource alarm blocks publishers, on a connection of its own
/// to `node` (a blocked connection cannot even be closed): a probe the
/// broker drops ([`pulse::alarm`]), then a request that needs an answer.
/// Under an alarm the broker blocks the connection at the probe and reads
/// nothing after it; otherwise the answer comes at once.
fn check_alarm(report: &mut Report, node: &AmqpUrl, publishes: bool) {
    let Ok(connection) = pulse::nodes::connect_to(node, "bzpush check alarm probe") else {
        return;
    };
    let Ok(channel) = pulse::alarm::probe_channel(&connection) else {
        return;
    };
    let mut watch = pulse::alarm::Watch::new(&connection, Some(channel.clone()));
    watch.probe();
    let blocked = watch.until_blocked();
    let answered = pulse::wait_at_most(
        "asking the broker",
        ALARM_PROBE_WAIT,
        future::or(
            async {
                channel
                    .basic_qos(0, BasicQosOptions::default())
                    .await
                    .map(|()| true)
            },
            async {
                blocked.await;
                Ok(false)
            },
        ),
    );
    match (answered, watch.blocked()) {
        (_, Some(reason)) => {
            let waits = if publishes {
                "; poll holds its changes until it clears, and loses none"
            } else {
                ""
            };
            report.warn(&format!(
                "broker {node}: {}{waits}",
                pulse::alarm::blocked_sentence(&reason)
            ));
        }
        (Ok(_), None) => {
            report.line(Ok(format!(
                "broker {node}: no resource alarm (publishers are not blocked)"
            )));
            close(connection);
        }
        (Err(e), None) => report.warn(&format!(
            "broker {node}: cannot tell whether a resource alarm blocks publishers ({e}); \
             may the user write to the default exchange?"
        )),
    }
}

/// Closes a connection `check` is done with; a broker that does not answer
/// is no news by then.
pub(super) fn close(connection: Connection) {
    let _ = pulse::wait("closing", connection.close(200, "check done".into()));
}

/// Each feed's queue next to the configuration: a queue that exists with
/// other arguments (a changed `BZPUSH_QUEUE_EXPIRES` or
/// `BZPUSH_QUEUE_TYPE`) is a warning, since serve consumes it as it is;
/// the line says how to apply the settings.
pub(super) fn check_queues(report: &mut Report, config: &ServeConfig, connection: &Connection) {
    for feed in 0..config.feeds.len() {
        let setup = ConsumerSetup::for_feed(config, feed);
        let queue = &setup.queue;
        match pulse::probe_queue(connection, &config.amqp.vhost(), &setup) {
            Ok(QueueState::Missing) => {
                report.line(Ok(format!(
                    "queue {queue:?}: not there yet; serve creates it ({})",
                    config.queue_type.name()
                )));
            }
            Ok(QueueState::Matches) => {
                report.line(Ok(format!(
                    "queue {queue:?}: exists as configured ({})",
                    config.queue_type.name()
                )));
            }
            Ok(QueueState::Differs(what)) => {
                report.warn(&what);
            }
            Err(e) => report.line(Err(format!(
                "queue {queue:?}: {e} — may the user in BZPUSH_AMQP_URL configure and read it?"
            ))),
        }
    }
}
