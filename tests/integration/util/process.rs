//! The `bzpush` binary as a child process: started with exactly the
//! settings a test gives, its log collected, where it listens read from the
//! systemd notify socket the harness gives it, killed when dropped.
//!
//! Shared with the benchmarks (see `basics.rs`): everything here is used
//! by both; what only the tests use is in `util/mod.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::{TestDb, amqp_url_at, unique, wait_until, watchdog};

/// How long a `serve` or `run` may take to listen.
pub const STARTUP: Duration = Duration::from_secs(20);

/// A running `bzpush` process; killed when dropped.
pub struct Bzpush {
    pub(super) child: Child,
    pub(super) log: Arc<Mutex<String>>,
    pub(super) notices: Notices,
    /// Its stderr, held and not read (a journald that is stuck), until
    /// [`Bzpush::read_stderr`].
    pub(super) held_stderr: Option<std::process::ChildStderr>,
}

/// The line `bzpush serve` and `run` send systemd once they listen, the
/// address after it.
const LISTENING: &str = "STATUS=serving WebSocket and HTTP on ";

/// A systemd notify socket the test owns, as systemd would pass one in
/// `NOTIFY_SOCKET`: what the child tells systemd (`READY=1`, `STATUS=...`),
/// one entry per line, in order. The harness learns a child's address here,
/// as a sysadmin reads it in `systemctl status`, instead of from its log.
pub(super) struct Notices {
    /// The `NOTIFY_SOCKET` value: an abstract socket, nothing to clean up.
    pub(super) name: String,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Notices {
    pub(super) fn bind() -> Notices {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let name = unique("bzpush-test-notify");
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("an abstract socket name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the test's notify socket");
        // Wakes the reader to look at `stop` now and then.
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a timeout on the notify socket");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (Arc::clone(&lines), Arc::clone(&stop));
        thread::Builder::new()
            .name("test-notify".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while !stopped.load(Ordering::Relaxed) {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let mut lines = sink.lock().expect("notices lock");
                            lines.extend(text.lines().map(str::to_string));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => panic!("reading the test's notify socket: {e}"),
                    }
                }
            })
            .expect("spawn the notify socket reader");
        Notices {
            name: format!("@{name}"),
            lines,
            stop,
        }
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Bzpush {
    /// Starts `bzpush <args>` with exactly the `BZPUSH_*` variables given
    /// (none inherited from the test's environment).
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Bzpush {
        Bzpush::start_with(args, env, Stdio::null())
    }

    /// As [`Bzpush::start`], with stdout going to `stdout`; `Stdio::piped()`
    /// leaves it to read from [`Bzpush::take_stdout`].
    pub fn start_with(args: &[&str], env: &[(&str, String)], stdout: Stdio) -> Bzpush {
        Bzpush::spawn(Bzpush::command(args, env), stdout)
    }

    /// Starts `command` (from [`Bzpush::command_under`]).
    fn spawn(mut command: Command, stdout: Stdio) -> Bzpush {
        let notices = Notices::bind();
        let mut child = command
            .env("NOTIFY_SOCKET", &notices.name)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the bzpush binary");
        let mut bzpush = Bzpush {
            held_stderr: child.stderr.take(),
            child,
            log: Arc::new(Mutex::new(String::new())),
            notices,
        };
        bzpush.read_stderr();
        bzpush
    }

    /// Reads its stderr into [`Bzpush::log`] from now on.
    pub fn read_stderr(&mut self) {
        let Some(stderr) = self.held_stderr.take() else {
            return;
        };
        let sink = Arc::clone(&self.log);
        thread::Builder::new()
            .name("test-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("  bzpush| {line}");
                    let mut log = sink.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            })
            .expect("spawn the stderr reader");
    }

    /// `bzpush <args>` with exactly the `BZPUSH_*` variables given.
    pub(super) fn command(args: &[&str], env: &[(&str, String)]) -> Command {
        Bzpush::command_under(&[], args, env)
    }

    /// As [`Bzpush::command`], run by `wrapper` if not empty: a program
    /// and its arguments that runs the command after them, such as
    /// `prlimit --nofile=400:400 --`.
    pub(super) fn command_under(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, String)],
    ) -> Command {
        watchdog::arm();
        let binary = env!("CARGO_BIN_EXE_bzpush");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("BZPUSH_") || key == "NOTIFY_SOCKET" {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// `bzpush poll` against `db` (reached at `db_addr`) and the broker at
    /// `amqp_addr`, publishing to `exchange`, with `extra` settings.
    pub fn poll(
        db: &TestDb,
        db_addr: &str,
        amqp_addr: &str,
        exchange: &str,
        extra: &[(&str, String)],
    ) -> Bzpush {
        let mut env = vec![
            ("BZPUSH_DATABASE_URL", db.url_at(db_addr)),
            // What the tests write: the extension's table (`extra` may
            // choose `bugs`, which is the default).
            ("BZPUSH_SOURCE", "push_notify".to_string()),
            ("BZPUSH_AMQP_URL", amqp_url_at(amqp_addr)),
            ("BZPUSH_EXCHANGE", exchange.to_string()),
            ("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name)),
            ("BZPUSH_POLL_INTERVAL", "100ms".to_string()),
            ("BZPUSH_LOG", "debug".to_string()),
        ];
        env.extend(extra.iter().cloned());
        Bzpush::start(&["poll"], &env)
    }

    /// `bzpush serve` with the broker at `amqp_addr` and `feeds`.
    pub fn serve_at(amqp_addr: &str, feeds: &str, extra: &[(&str, String)]) -> Bzpush {
        Bzpush::serve_under(&[], amqp_addr, feeds, extra)
    }

    /// As [`Bzpush::serve_at`], run by `wrapper` (see
    /// [`Bzpush::command_under`]).
    pub fn serve_under(
        wrapper: &[&str],
        amqp_addr: &str,
        feeds: &str,
        extra: &[(&str, String)],
    ) -> Bzpush {
        let mut env = vec![
            ("BZPUSH_AMQP_URL", amqp_url_at(amqp_addr)),
            ("BZPUSH_FEEDS", feeds.to_string()),
            (
                "BZPUSH_QUEUE",
                format!("queue/guest/{}", unique("bzpush-test")),
            ),
            ("BZPUSH_QUEUE_EXPIRES", "2m".to_string()),
            ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
            ("BZPUSH_LOG", "debug".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let server = Bzpush::spawn(
            Bzpush::command_under(wrapper, &["serve"], &env),
            Stdio::null(),
        );
        assert!(
            server.wait_listening(STARTUP),
            "bzpush serve did not start:\n{}",
            server.log()
        );
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Every line the process sent its notify socket so far (`READY=1`,
    /// `STATUS=...`), in order.
    pub fn notices(&self) -> Vec<String> {
        self.notices.lines.lock().expect("notices lock").clone()
    }

    /// Waits for a notify line starting with `prefix` and returns the first
    /// such line; `None` on timeout.
    pub fn wait_for_notice(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let find = || self.notices().into_iter().find(|l| l.starts_with(prefix));
        let mut found = None;
        wait_until(timeout, || {
            found = find();
            found.is_some()
        });
        found
    }

    /// Waits until the process says (on its notify socket) where it
    /// listens; `false` on timeout.
    pub fn wait_listening(&self, timeout: Duration) -> bool {
        self.wait_for_notice(LISTENING, timeout).is_some()
    }

    /// The address the process listens on, from its `STATUS=` line.
    pub fn listen_addr(&self) -> String {
        let line = self
            .notices()
            .into_iter()
            .find(|l| l.starts_with(LISTENING))
            .unwrap_or_else(|| {
                panic!(
                    "the process never said where it listens; its notices: {:?}, its log:\n{}",
                    self.notices(),
                    self.log()
                )
            });
        line[LISTENING.len()..].to_string()
    }

    /// Waits until the broker consumers are up (`/health` says 200).
    pub fn wait_healthy(&self) {
        let addr = self.listen_addr();
        assert!(
            wait_until(STARTUP, || http_get(&addr, "/health").0 == 200),
            "the server never became healthy:\n{}",
            self.log()
        );
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bzpush {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A plain HTTP GET: `(status, body)`.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut socket = TcpStream::connect(addr).expect("connect for HTTP");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(socket, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut response = String::new();
    let _ = socket.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
