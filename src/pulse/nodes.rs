//! The broker's nodes: the URLs of one RabbitMQ cluster, which of them a
//! process uses, and connecting to one.
//!
//! A process starts at a random node, so that servers spread over the
//! cluster; a connection attempt tries each node once, in turn, from there;
//! after losing its node a process starts from the next one. It knows how
//! long no node has answered, which the poller weighs against its grace
//! before it lets go of the lock. Nothing here opens a channel or decides
//! when to retry: that is the publisher's and the consumer's.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use lapin::ConnectionProperties;

use super::{BrokerError, Cause, OPERATION_TIMEOUT, bounded};
use crate::config::{AmqpNodes, AmqpUrl};

/// The nodes of one cluster and this process's place among them.
pub struct Nodes {
    nodes: AmqpNodes,
    /// The node the next attempt starts at.
    next: usize,
    /// The node of the connection in use, if any.
    current: Option<usize>,
    /// The node of the last connection, in use or lost.
    last: Option<usize>,
    /// When a node last answered (a connection made, or an operation on it
    /// that worked); at first, when this was made.
    answered: Instant,
    /// No node answers since `answered`: the last connection was lost, or
    /// the last attempt reached none.
    unreachable: bool,
}

impl Nodes {
    /// `nodes`, starting at a random one.
    pub fn new(nodes: AmqpNodes) -> Nodes {
        let count = nodes.nodes().len() as u64;
        // RandomState is seeded per process: enough to spread servers.
        let next = (RandomState::new().hash_one(std::process::id()) % count) as usize;
        Nodes {
            nodes,
            next,
            current: None,
            last: None,
            answered: Instant::now(),
            unreachable: false,
        }
    }

    /// Connects, as `name` (shown in the broker's connection list), to the
    /// first node that answers, trying each once from where the last
    /// attempt left off. On failure, the error names every node tried.
    pub fn connect(&mut self, name: &str) -> Result<lapin::Connection, BrokerError> {
        let count = self.nodes.nodes().len();
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (self.next + step) % count;
            let node = &self.nodes.nodes()[index];
            match connect_to(node, name) {
                Ok(connection) => {
                    self.current = Some(index);
                    self.last = Some(index);
                    self.next = index;
                    self.answered();
                    return Ok(connection);
                }
                Err(e) => failures.push((node.to_string(), e)),
            }
        }
        self.lost();
        Err(match failures.len() {
            1 => failures.remove(0).1,
            _ => BrokerError {
                doing: "connecting",
                cause: Cause::EveryNode(failures),
            },
        })
    }

    /// A node answered: the broker is reachable.
    pub fn answered(&mut self) {
        self.answered = Instant::now();
        self.unreachable = false;
    }

    /// The connection in use was lost or given up: the next attempt starts
    /// at the next node.
    pub fn lost(&mut self) {
        if let Some(current) = self.current.take() {
            self.next = (current + 1) % self.nodes.nodes().len();
        }
        self.unreachable = true;
    }

    /// How long no node has answered; `None` while one does.
    pub fn unreachable_for(&self) -> Option<Duration> {
        self.unreachable.then(|| self.answered.elapsed())
    }

    /// The node in use, if connected.
    pub fn current(&self) -> Option<&AmqpUrl> {
        self.current.map(|i| &self.nodes.nodes()[i])
    }

    /// The node in use or, while none is, the one last used (or every
    /// node, before the first connection): for log lines, without
    /// passwords.
    pub fn describe(&self) -> String {
        self.current.or(self.last).map_or_else(
            || self.nodes.to_string(),
            |i| self.nodes.nodes()[i].to_string(),
        )
    }
}

/// Connects to `node`, bounded like every broker operation.
pub fn connect_to(node: &AmqpUrl, name: &str) -> Result<lapin::Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    bounded("connecting", OPERATION_TIMEOUT, async {
        lapin::Connection::connect(node.secret(), properties)
            .await
            .map_err(|e| BrokerError::connecting(node, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &str) -> Nodes {
        Nodes::new(AmqpNodes::parse(list).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn a_lost_node_moves_the_next_attempt_to_the_next_node_and_counts_as_unreachable() {
        let mut n = nodes("amqp://u:p@a/%2f,amqp://u:p@b/%2f,amqp://u:p@c/%2f");
        assert_eq!(n.unreachable_for(), None);
        assert_eq!(
            n.describe(),
            "amqp://u:***@a/%2f,amqp://u:***@b/%2f,amqp://u:***@c/%2f"
        );
        (n.current, n.last) = (Some(2), Some(2));
        n.lost();
        assert_eq!((n.next, n.current), (0, None));
        assert!(n.unreachable_for().is_some());
        assert_eq!(n.describe(), "amqp://u:***@c/%2f", "the node lost");
        n.current = Some(1);
        n.answered();
        assert_eq!(n.unreachable_for(), None);
        assert_eq!(n.describe(), "amqp://u:***@b/%2f");
    }

    #[test]
    fn processes_start_at_different_nodes() {
        let list = "amqp://a,amqp://b,amqp://c,amqp://d,amqp://e,amqp://f,amqp://g,amqp://h";
        let starts: std::collections::HashSet<usize> = (0..20).map(|_| nodes(list).next).collect();
        assert!(starts.len() > 1, "every start was the same node");
    }
}
