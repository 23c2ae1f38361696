//! Chaos on a RabbitMQ cluster: "no single machine" (README, "Scaling
//! out"; SPEC §4.1), end to end.
//!
//! The chaos run of [`super::chaos`] (its writers, its clients reconnecting
//! with `since`, its verdict), against three RabbitMQ nodes of the test's
//! own ([`PrivateRabbit`]) in place of the shared broker and its proxies:
//! two `bzpush poll` and two `bzpush serve` (each its own quorum queue and
//! the catch-up database), every one given all three nodes. Writers change
//! bugs at ~100 changes/s while faults come at random moments from a
//! seeded PRNG: `kill -9` of a RabbitMQ node (restarted at the next node
//! fault, so never two down at once), of the active poller (a new one
//! starts), of a server (restarted with the same queue; its clients
//! reconnect to either server with `since`). At the end every client has
//! seen every subscribed bug's latest change, or was told `partial` and
//! asked again.
//!
//! Bounded by default (~60 s of faults, about two minutes in all).
//! `CLUSTER_CHAOS_SECS=600` soaks longer; `CLUSTER_CHAOS_SEED=<n>` replays
//! a run's fault schedule (printed at the start). Run with `--nocapture`
//! to see the report.

use std::time::Instant;

use crate::chaos::{
    Chaos, Proc, System, Timeline, World, poller_in_role, populate, replace_active_poller,
    replace_server, run, setup_bugs,
};
use crate::util::{Bzpush, MYSQL_ADDR, PrivateRabbit, Rng, TestDb, unique};

/// Changes per second, all writers together.
const RATE: f64 = 100.0;
const DEFAULT_CHAOS_SECS: u64 = 60;
/// Pause between two faults, in milliseconds: a node takes ~5 s to come
/// back, a server or poller a second or two.
const FAULT_GAP_MS: (u64, u64) = (3000, 7000);

#[test]
fn any_node_poller_or_server_may_die_and_no_client_misses_a_change() {
    let mut chaos = Chaos::from_env("CLUSTER_CHAOS", DEFAULT_CHAOS_SECS, RATE);
    chaos.fault_gap_ms = FAULT_GAP_MS;
    let db = TestDb::new();
    setup_bugs(&db);
    let mut cluster = RabbitCluster::start(&db);
    run(&mut cluster, &db, &chaos);
}

/// The processes under test, and the RabbitMQ nodes between them.
struct RabbitCluster<'a> {
    db: &'a TestDb,
    rabbit: PrivateRabbit,
    exchange: String,
    /// Each server slot's queue name, kept across restarts.
    queues: [String; 2],
    pollers: Vec<Proc>,
    servers: Vec<Proc>,
    /// The node down, and since when.
    down: Option<(usize, Instant)>,
}

impl<'a> RabbitCluster<'a> {
    /// An active poller, a standby and two servers on a new cluster, all
    /// healthy.
    fn start(db: &'a TestDb) -> RabbitCluster<'a> {
        let mut cluster = RabbitCluster {
            db,
            rabbit: PrivateRabbit::cluster(),
            exchange: unique("bzpush.test"),
            queues: [unique("bzpush-chaos"), unique("bzpush-chaos")],
            pollers: Vec::new(),
            servers: Vec::new(),
            down: None,
        };
        populate(&mut cluster);
        cluster
    }
}

impl System for RabbitCluster<'_> {
    fn processes(&mut self) -> (&mut Vec<Proc>, &mut Vec<Proc>) {
        (&mut self.pollers, &mut self.servers)
    }

    /// A poller given every node.
    fn start_poller(&self, roles: &[&str]) -> Proc {
        let poller = Bzpush::poll(
            self.db,
            MYSQL_ADDR,
            &self.rabbit.addr(0),
            &self.exchange,
            &[
                ("BZPUSH_AMQP_URL", self.rabbit.urls()),
                ("BZPUSH_LOG", "info".to_string()),
            ],
        );
        poller_in_role(poller, roles)
    }

    /// A server given every node, with the catch-up database.
    fn start_server(&self, slot: usize) -> Proc {
        let server = Bzpush::serve_at(
            &self.rabbit.addr(0),
            &format!("/={}", self.exchange),
            &[
                ("BZPUSH_AMQP_URL", self.rabbit.urls()),
                ("BZPUSH_QUEUE", format!("queue/guest/{}", self.queues[slot])),
                ("BZPUSH_CATCHUP_DATABASE_URL", self.db.url()),
                ("BZPUSH_LOG", "info".to_string()),
            ],
        );
        server.wait_healthy();
        Proc::new("serve", server)
    }

    fn inject(&mut self, rng: &mut Rng, world: &World, timeline: &mut Timeline) -> &'static str {
        match rng.below(3) {
            0 => match self.down.take() {
                // Never two down at once: the one down comes back first.
                Some((node, since)) => {
                    self.rabbit.restart(node);
                    timeline.note(format!(
                        "restarted RabbitMQ node {node}, down for {:.1} s",
                        since.elapsed().as_secs_f64()
                    ));
                    "restart a RabbitMQ node"
                }
                None => {
                    let node = rng.below(self.rabbit.len());
                    self.rabbit.kill9(node);
                    self.down = Some((node, Instant::now()));
                    timeline.note(format!("kill -9 RabbitMQ node {node}"));
                    "kill -9 a RabbitMQ node"
                }
            },
            1 => replace_active_poller(self, rng, world, timeline),
            _ => replace_server(self, rng, world, timeline),
        }
    }
}
