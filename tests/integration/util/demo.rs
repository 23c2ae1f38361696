//! Harness for `bzpush demo` and the live page: the demo process and the
//! one line it prints, Debian's headless Chromium loading a page, and
//! nginx started with the README's `location /bzpush/` block.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use super::{Bzpush, unique, wait_until};

/// How long the demo may take to print its address (a scratch database
/// is created first).
const STARTUP: Duration = Duration::from_secs(30);
/// How long one headless Chromium run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// A running `bzpush demo` and the address it printed.
pub struct Demo {
    pub bzpush: Bzpush,
    /// The one line printed, without its newline: `http://IP:PORT/`.
    pub page_url: String,
    /// Everything printed to stdout, whole once the process has ended.
    stdout: thread::JoinHandle<String>,
}

impl Demo {
    /// `bzpush demo <args>` with exactly the `BZPUSH_*` variables `env`;
    /// returns once it printed its address.
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Demo {
        let mut command = vec!["demo"];
        command.extend_from_slice(args);
        let mut bzpush = Bzpush::start_with(&command, env, Stdio::piped());
        let stdout = bzpush.take_stdout().expect("piped stdout");
        let (first_tx, first_rx) = crossbeam_channel::bounded(1);
        let stdout = thread::Builder::new()
            .name("test-demo-stdout".into())
            .spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut all = String::new();
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() {
                    let _ = first_tx.send(line.clone());
                }
                all.push_str(&line);
                let _ = reader.read_to_string(&mut all);
                all
            })
            .expect("spawn the stdout reader");
        let line = first_rx.recv_timeout(STARTUP).unwrap_or_else(|_| {
            panic!(
                "bzpush demo printed no address within {STARTUP:?}:\n{}",
                bzpush.log()
            )
        });
        let page_url = line.trim_end().to_string();
        assert!(
            page_url.starts_with("http://") && page_url.ends_with('/'),
            "the demo's line is not a page address: {line:?}\n{}",
            bzpush.log()
        );
        Demo {
            bzpush,
            page_url,
            stdout,
        }
    }

    /// `IP:PORT` of the page.
    pub fn addr(&self) -> String {
        self.page_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr())
    }

    /// SIGTERM, then the exit status and everything printed to stdout.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.bzpush.sigterm();
        let status = self
            .bzpush
            .wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| {
                panic!(
                    "bzpush demo still ran 30 s after SIGTERM:\n{}",
                    self.bzpush.log()
                )
            });
        let stdout = self.stdout.join().expect("stdout reader");
        (status, stdout)
    }
}

/// The updates a page's DOM shows: `(bug, when)` of each `data-bug` item.
pub fn shown_updates(dom: &str) -> Vec<(u32, String)> {
    dom.split("data-bug=\"")
        .skip(1)
        .filter_map(|rest| {
            let (bug, rest) = rest.split_once('"')?;
            let when = rest.split("data-when=\"").nth(1)?.split('"').next()?;
            Some((bug.parse().ok()?, when.to_string()))
        })
        .collect()
}

/// Loads `url` in Chromium until its page shows an update, live ones (the
/// page asks for no catch-up before it has seen a `when`), so in real time,
/// not on a virtual clock; the DOM then.
pub fn chromium_until_updates(url: &str) -> String {
    let mut browser = Browser::open(url);
    let shown = browser.wait_for(
        "document.querySelectorAll('#updates li.update').length > 0",
        BROWSER_TIMEOUT,
    );
    let dom = browser.eval("document.documentElement.outerHTML");
    let dom = dom.as_str().unwrap_or_default().to_string();
    assert!(
        shown,
        "the page at {url} never showed an update; its last DOM:\n{dom}"
    );
    dom
}

/// The README's nginx `location` block, exactly as printed there.
pub fn readme_nginx_block() -> String {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("```nginx\n")
        .expect("the README has an nginx block")
        + "```nginx\n".len();
    let len = readme[start..].find("```").expect("the nginx block ends");
    readme[start..start + len].to_string()
}

/// nginx as a child process with its own prefix, configuration and port,
/// serving `location` (a block from the README) and nothing else.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Nginx {
    pub fn start(location: &str) -> Nginx {
        super::watchdog::arm();
        let dir = TempDir::new("bzpush-nginx");
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            listener.local_addr().expect("its address")
        };
        let d = dir.0.display();
        let config = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen {addr};\n{location}\n  }}\n}}\n"
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, config).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nginx ({e}): the proxy test needs Debian's nginx: \
                     run ./test, which installs it"
                )
            });
        let mut nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(20), || {
            TcpStream::connect(addr).is_ok() || !matches!(nginx.child.try_wait(), Ok(None))
        });
        assert!(
            up && matches!(nginx.child.try_wait(), Ok(None)),
            "nginx did not start on {addr}: {}",
            std::fs::read_to_string(nginx._dir.0.join("error.log")).unwrap_or_default()
        );
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of its own, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Headless Chromium driven over the DevTools protocol: one page, whose
/// scripts run in real time, and JavaScript evaluated in it on demand.
pub struct Browser {
    child: Child,
    devtools: tungstenite::WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    _profile: TempDir,
}

impl Browser {
    /// Opens `url` in a new headless Chromium. Fails the test, saying how
    /// to install it, if there is no `chromium`.
    pub fn open(url: &str) -> Browser {
        super::watchdog::arm();
        let profile = TempDir::new("bzpush-chromium");
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run chromium ({e}): the browser test needs Debian's chromium: \
                     run ./test, which installs it"
                )
            });
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::Builder::new()
            .name("test-chromium-stderr".into())
            .spawn(move || {
                // Read to the end so that Chromium never blocks on a full pipe.
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let _ = tx.try_send(url.trim().to_string());
                    }
                }
            })
            .expect("spawn the chromium stderr reader");
        let endpoint = match rx.recv_timeout(BROWSER_TIMEOUT) {
            Ok(endpoint) => endpoint,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not open its DevTools port within {BROWSER_TIMEOUT:?}");
            }
        };
        let addr: SocketAddr = endpoint
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("DevTools address {endpoint:?}"));
        let socket = TcpStream::connect(addr).expect("connect to DevTools");
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (devtools, _) = tungstenite::client(endpoint.as_str(), socket)
            .unwrap_or_else(|e| panic!("DevTools handshake: {e}"));
        let mut browser = Browser {
            child,
            devtools,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", serde_json::json!({"url": url}));
        let target_id = target["targetId"].clone();
        let attached = browser.call(
            "Target.attachToTarget",
            serde_json::json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser
    }

    /// Sends a DevTools command (to the page once attached) and returns
    /// its result; events that come first are skipped.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let mut command =
            serde_json::json!({"id": self.next_id, "method": method, "params": params});
        if !self.session.is_empty() {
            command["sessionId"] = self.session.clone().into();
        }
        self.devtools
            .send(tungstenite::Message::text(command.to_string()))
            .expect("send to DevTools");
        loop {
            let message = self.devtools.read().expect("read from DevTools");
            let tungstenite::Message::Text(text) = message else {
                continue;
            };
            let reply: serde_json::Value =
                serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if reply["id"] == self.next_id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of JavaScript `expression` in the page.
    pub fn eval(&mut self, expression: &str) -> serde_json::Value {
        let result = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page; `false` after
    /// `timeout`.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.eval(expression) == true)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
