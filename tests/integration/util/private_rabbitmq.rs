//! RabbitMQ of a test's own: one node, or a cluster of three, on loopback,
//! with its own node names, ports (AMQP and Erlang distribution), data and
//! log folders, configuration and Erlang cookie, all in a temporary folder;
//! every process it started, and the folder, go when it is dropped.
//!
//! For what a test must not do to the shared broker on 5672: kill a node,
//! raise a resource alarm. That broker is never touched: every
//! `rabbitmqctl` here names a node of ours (`-n`), with our cookie. The
//! nodes register with the machine's `epmd` (started by the first node if
//! none runs; it may stay). A cluster takes ~15 s to start on two cores,
//! so clusters start one at a time ([`CLUSTERS`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use super::run::closed_port;
use super::{amqp_url_at, broker, consume, unique, wait_until, wait_until_every, within};

/// Where Debian's `rabbitmq-server` package keeps the scripts that run a
/// node as the calling user (`/usr/sbin`'s wrappers switch to the
/// `rabbitmq` user, and to its cookie).
const SCRIPTS: &str = "/usr/lib/rabbitmq/bin";
const INSTALL: &str = "RabbitMQ's scripts must be in /usr/lib/rabbitmq/bin (Debian's \
    rabbitmq-server package: run ./test, which installs it)";
/// How long a node may take to answer AMQP after it was started.
const NODE_START: Duration = Duration::from_secs(90);

/// One cluster at a time: three nodes booting at once take both cores of
/// a CI machine for ~15 s, and tests run in parallel.
static CLUSTERS: Mutex<()> = Mutex::new(());

/// A private RabbitMQ: its nodes, each reachable on `127.0.0.1`.
pub struct PrivateRabbit {
    dir: PathBuf,
    nodes: Vec<Node>,
    _one_at_a_time: Option<MutexGuard<'static, ()>>,
}

struct Node {
    /// `bzpush-…-N@localhost`.
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// The `rabbitmq-server` script, whose child is the node.
    child: Option<Child>,
}

impl PrivateRabbit {
    /// One node, started and answering AMQP.
    pub fn node() -> PrivateRabbit {
        PrivateRabbit::start(1)
    }

    /// A cluster of three nodes, started, clustered and answering AMQP.
    pub fn cluster() -> PrivateRabbit {
        PrivateRabbit::start(3)
    }

    fn start(count: usize) -> PrivateRabbit {
        let guard = (count > 1).then(|| CLUSTERS.lock().unwrap_or_else(|e| e.into_inner()));
        assert!(
            Path::new(SCRIPTS).join("rabbitmq-server").exists(),
            "{INSTALL}"
        );
        let dir = std::env::temp_dir().join(unique("bzpush-rabbitmq"));
        std::fs::create_dir_all(&dir).expect("create the private broker's folder");
        let tag = unique("bzpush").replace('_', "-");
        let nodes: Vec<Node> = (1..=count)
            .map(|i| Node {
                name: format!("{tag}-{i}@localhost"),
                amqp_port: port(),
                dist_port: port(),
                child: None,
            })
            .collect();
        let mut rabbit = PrivateRabbit {
            dir,
            nodes,
            _one_at_a_time: guard,
        };
        rabbit.write_files();
        for i in 0..count {
            rabbit.launch(i);
        }
        for i in 0..count {
            rabbit.wait_answering(i);
        }
        if count > 1 {
            let all = wait_until(NODE_START, || rabbit.running_nodes(0) == count);
            assert!(
                all,
                "the private cluster did not form: {} of {count} nodes running; see {}",
                rabbit.running_nodes(0),
                rabbit.dir.display()
            );
        }
        rabbit
    }

    /// The cookie, and each node's configuration: its listener on
    /// loopback, and its peers.
    fn write_files(&self) {
        use std::os::unix::fs::PermissionsExt;
        let cookie = self.dir.join(".erlang.cookie");
        std::fs::write(&cookie, unique("cookie")).expect("write the Erlang cookie");
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("the cookie must be private to its owner");
        // In place of /etc/rabbitmq/rabbitmq-env.conf, which names the
        // shared node: distribution on loopback only.
        std::fs::write(
            self.dir.join("rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .expect("write rabbitmq-env.conf");
        for (i, node) in self.nodes.iter().enumerate() {
            let base = self.base(i);
            std::fs::create_dir_all(&base).expect("create a node's folder");
            let mut config = format!(
                "loopback_users = none\nlisteners.tcp.1 = 127.0.0.1:{}\n",
                node.amqp_port
            );
            if self.nodes.len() > 1 {
                config.push_str("cluster_formation.peer_discovery_backend = classic_config\n");
                for (j, peer) in self.nodes.iter().enumerate() {
                    config.push_str(&format!(
                        "cluster_formation.classic_config.nodes.{} = {}\n",
                        j + 1,
                        peer.name
                    ));
                }
            }
            std::fs::write(base.join("rabbitmq.conf"), config).expect("write rabbitmq.conf");
        }
    }

    fn base(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{}", i + 1))
    }

    /// `command` with our cookie (through `HOME`) and none of the shared
    /// node's settings.
    fn env(&self, command: &mut Command) {
        command
            .env("HOME", &self.dir)
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RABBITMQ_NODENAME");
    }

    /// Starts node `i` (again, after [`PrivateRabbit::kill9`]: same name,
    /// ports and data), without waiting for it.
    fn launch(&mut self, i: usize) {
        let base = self.base(i);
        let node = &self.nodes[i];
        let log = std::fs::File::create(base.join("stdout.log")).expect("create a node's log");
        let mut command = Command::new(Path::new(SCRIPTS).join("rabbitmq-server"));
        self.env(&mut command);
        command
            .current_dir(&base)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_BASE", &base)
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                base.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                base.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", base.join("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a node's log"))
            .stderr(log);
        let child = command.spawn().unwrap_or_else(|e| panic!("{INSTALL}: {e}"));
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` answers AMQP.
    fn wait_answering(&self, i: usize) {
        let url = amqp_url_at(&self.addr(i));
        let answers = wait_until_every(NODE_START, Duration::from_millis(500), || {
            let connect = Connection::connect(&url, ConnectionProperties::default());
            match within(Duration::from_secs(5), connect) {
                Some(Ok(connection)) => {
                    let _ = within(Duration::from_secs(5), connection.close(200, "up".into()));
                    true
                }
                _ => false,
            }
        });
        assert!(
            answers,
            "private RabbitMQ node {} did not answer on {} within {NODE_START:?}; see {}",
            self.nodes[i].name,
            self.addr(i),
            self.base(i).display()
        );
    }

    /// `127.0.0.1:PORT` of node `i`'s AMQP listener.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].amqp_port)
    }

    /// Node `i`'s AMQP URL, as guest.
    pub fn url(&self, i: usize) -> String {
        amqp_url_at(&self.addr(i))
    }

    /// Every node's URL, comma-separated: `BZPUSH_AMQP_URL` for the cluster.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether node `i` runs (was not killed, or was restarted).
    fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// `kill -9` of node `i`'s Erlang VM; its helpers go with it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(pid) = self.beam_pid(i) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_file(self.base(i).join("pid"));
        }
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again after [`PrivateRabbit::kill9`] and waits until
    /// it answers; it rejoins its cluster.
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_up(i), "node {i} still runs");
        let _ = std::fs::remove_file(self.base(i).join("pid"));
        self.launch(i);
        self.wait_answering(i);
    }

    fn beam_pid(&self, i: usize) -> Option<String> {
        let pid = std::fs::read_to_string(self.base(i).join("pid")).ok()?;
        let pid = pid.trim();
        (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.to_string())
    }

    /// `rabbitmqctl -n <node i> <args>`, to its end.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Output {
        let mut command = Command::new(Path::new(SCRIPTS).join("rabbitmqctl"));
        self.env(&mut command);
        command
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{INSTALL}: {e}"))
    }

    /// `rabbitmqctl -n <node i> <args>`; fails the test if it fails.
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.ctl(i, args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {}: {}{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many nodes node `i` sees running in its cluster.
    fn running_nodes(&self, i: usize) -> usize {
        let out = self.ctl(i, &["cluster_status", "--formatter", "json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|status| status["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Raises a memory alarm on node `i` (the cluster's publishers are
    /// blocked until [`PrivateRabbit::clear_alarm`]).
    pub fn raise_alarm(&self, i: usize) {
        self.ctl_ok(i, &["set_vm_memory_high_watermark", "0.0000001"]);
    }

    /// Ends the alarm of [`PrivateRabbit::raise_alarm`].
    pub fn clear_alarm(&self, i: usize) {
        self.ctl_ok(i, &["set_vm_memory_high_watermark", "0.4"]);
    }

    /// Connections node `i` holds now, by name: `(name, state)` pairs.
    pub fn connections(&self, i: usize) -> Vec<(String, String)> {
        let out = self.ctl_ok(
            i,
            &[
                "list_connections",
                "client_properties",
                "state",
                "--formatter",
                "json",
            ],
        );
        let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        list.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let name = c["client_properties"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p[0] == "connection_name")
                    .and_then(|p| p[2].as_str())
                    .unwrap_or_default()
                    .to_string();
                (name, c["state"].as_str().unwrap_or_default().to_string())
            })
            .collect()
    }
}

/// A consumer of the test's own on one node: a queue bound with `#` to an
/// exchange, and the `(payload.id, payload.delta_ts)` of each message.
pub struct Listener {
    pub received: crossbeam_channel::Receiver<(u64, String)>,
    _connection: Connection,
}

impl PrivateRabbit {
    /// Declares `exchange` (as the publisher does) on node `i`, and
    /// consumes it there through a new queue: a quorum queue if `quorum`
    /// (replicated over the cluster: it survives the loss of another
    /// node), else an exclusive classic one.
    pub fn listen(&self, i: usize, exchange: &str, quorum: bool) -> Listener {
        use lapin::options::{QueueBindOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let connection = broker(
            "connect to a private node",
            Connection::connect(&self.url(i), ConnectionProperties::default()),
        );
        let channel = broker("open a channel", connection.create_channel());
        broker(
            "declare the exchange",
            bzpush::pulse::declare_exchange(&channel, exchange),
        );
        let mut arguments = FieldTable::default();
        let options = if quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            }
        } else {
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            }
        };
        let queue = unique("test-listener");
        broker(
            "declare the test queue",
            channel.queue_declare(queue.as_str().into(), options, arguments),
        );
        broker(
            "bind the test queue",
            channel.queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        );
        let received = consume(&channel, &queue, |delivery| {
            let json: serde_json::Value =
                serde_json::from_slice(&delivery.data).unwrap_or_default();
            let bug = json["payload"]["id"].as_u64().unwrap_or_default();
            let when = json["payload"]["delta_ts"].as_str().unwrap_or_default();
            (bug, when.to_string())
        });
        Listener {
            received,
            _connection: connection,
        }
    }

    /// Which node a `bzpush` process says, in its last "connected" line,
    /// it uses.
    pub fn node_of(&self, log: &str) -> Option<usize> {
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("broker amqp") && l.contains(": connected"))?;
        (0..self.len()).find(|&i| line.contains(&format!("@{}/", self.addr(i))))
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on loopback.
fn port() -> u16 {
    closed_port()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port number")
}
