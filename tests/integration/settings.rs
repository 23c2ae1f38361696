//! Settings that can never work, and what the operator sees (issue 9),
//! against the real binary, real MariaDB and real WebSocket clients: `check`
//! binding the listen address; singleton headers sent twice; journal
//! priorities on stderr and on `check`'s stdout; no URL setting printing its
//! password, in errors, `check` or logs; host `localhost` as the Unix socket
//! and "Access denied" naming the host tried; allowed origins compared as
//! browsers send them, refusals logged once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::run::{TestUser, closed_port};
use crate::util::{Bzpush, Finished, MYSQL_ADDR, TestDb, unique, wait_until};

/// `bzpush check <mode>` with exactly `env`.
fn check(mode: &str, env: &[(&str, String)]) -> Finished {
    let finished = Bzpush::run(&["check", mode], env, Duration::from_secs(30));
    eprintln!("check {mode}:\n{}{}", finished.stdout, finished.stderr);
    finished
}

// ---- the listen address ----

#[test]
fn check_fails_when_the_listen_port_is_in_use() {
    let db = TestDb::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address").to_string();
    for mode in ["run", "serve"] {
        let finished = check(
            mode,
            &[
                ("BZPUSH_DATABASE_URL", db.url()),
                ("BZPUSH_LISTEN", addr.clone()),
            ],
        );
        assert_eq!(finished.status.code(), Some(1), "check {mode} must fail");
        assert!(
            finished
                .stdout
                .lines()
                .any(|l| l.starts_with(&format!("FAIL  listen {addr}: in use"))),
            "check {mode}: no FAIL line naming {addr}:\n{}",
            finished.stdout
        );
    }
    // Once the port is free, the same check passes that line, and leaves
    // the port free (`run` can then bind it).
    drop(taken);
    let finished = check(
        "run",
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_LISTEN", addr.clone()),
        ],
    );
    assert!(
        finished
            .stdout
            .contains(&format!("ok    listen {addr}: free")),
        "{}",
        finished.stdout
    );
    TcpListener::bind(&addr).expect("check released the port");
}

// ---- handshake headers that may appear once ----

/// Sends `request` on a fresh socket; the response's status line.
fn status_line(addr: &str, request: &str) -> String {
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    socket.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    // Read only the head: a 101 leaves the socket open.
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_string()
}

#[test]
fn duplicated_singleton_headers_get_400() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[]);
    let addr = server.listen_addr();
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let host = format!("Host: {addr}\r\n");
    let origin = "Origin: https://bugzilla.example.org\r\n";
    let upgrade = |extra: &str| {
        format!(
            "GET / HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             {key}{version}{origin}{extra}\r\n"
        )
    };
    // The control: one of each is a handshake.
    assert!(
        status_line(&addr, &upgrade("")).starts_with("HTTP/1.1 101"),
        "a plain handshake must succeed"
    );
    // List-valued fields may repeat.
    assert!(
        status_line(
            &addr,
            &upgrade("Connection: keep-alive\r\nUpgrade: websocket\r\n")
        )
        .starts_with("HTTP/1.1 101")
    );
    let cases = [
        (
            "two keys",
            upgrade("Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"),
        ),
        ("the same key twice", upgrade(key)),
        ("two versions", upgrade("Sec-WebSocket-Version: 13\r\n")),
        ("two origins", upgrade("Origin: https://evil.example\r\n")),
        ("two hosts", upgrade("Host: evil.example\r\n")),
        (
            "two lengths",
            upgrade("Content-Length: 0\r\nContent-Length: 0\r\n"),
        ),
        (
            "two hosts on plain HTTP",
            format!("GET /health HTTP/1.1\r\n{host}Host: evil.example\r\n\r\n"),
        ),
        (
            "two keys, other case",
            upgrade("sec-websocket-key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request) in &cases {
        let status = status_line(&addr, request);
        if !status.starts_with("HTTP/1.1 400") {
            wrong.push(format!("{name}: {status:?}"));
        }
    }
    assert!(wrong.is_empty(), "expected 400 for {wrong:#?}");
    // The server still serves.
    assert!(status_line(&addr, &upgrade("")).starts_with("HTTP/1.1 101"));
}

// ---- journal priorities ----

/// `bzpush <args>` with `env` only, its stdout and stderr a file of its own; with
/// `JOURNAL_STREAM` naming that file's device and inode if `journal`, or
/// naming some other file if not (inherited, stale), as systemd would.
/// Runs until `done` holds for the log or 30 s pass, then SIGTERM; the log.
fn log_of(
    args: &[&str],
    env: &[(&str, String)],
    journal: bool,
    done: impl Fn(&str) -> bool,
) -> String {
    let path = std::env::temp_dir().join(unique("bzpush-stderr"));
    let file = std::fs::File::create(&path).expect("create the stderr file");
    let meta = if journal {
        file.metadata().expect("its metadata")
    } else {
        std::fs::metadata(std::env::temp_dir()).expect("another file")
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_bzpush"))
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        // journald connects stdout and stderr to one stream.
        .stdout(file.try_clone().expect("a second descriptor"))
        .stderr(file)
        .spawn()
        .expect("start bzpush");
    let read = |path: &PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    wait_until(Duration::from_secs(30), || done(&read(&path)));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = read(&path);
    let _ = std::fs::remove_file(&path);
    eprintln!("bzpush {args:?} (journal: {journal}):\n{log}");
    log
}

#[test]
fn lines_carry_their_priority_when_stderr_is_the_journal() {
    // A database that refuses connections: bzpush says so with a warning.
    let env = [
        (
            "BZPUSH_DATABASE_URL",
            format!("mysql://bugs@{}/bugs", closed_port()),
        ),
        ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
        ("BZPUSH_LOG", "debug".to_string()),
    ];
    let warned = |log: &str| log.contains("WARN]");
    let log = log_of(&["run"], &env, true, warned);
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("<4>[WARN] database")),
        "no warning at priority 4:\n{log}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("<6>[INFO] bzpush ")),
        "no start line at priority 6:\n{log}"
    );
    for line in &lines {
        let priority = match line.get(..4) {
            Some("<3>[") => "ERROR",
            Some("<4>[") => "WARN",
            Some("<6>[") => "INFO",
            Some("<7>[") => "DEBUG",
            _ => panic!("a line without its priority: {line:?}"),
        };
        assert!(
            line[4..].starts_with(priority)
                || (priority == "DEBUG" && line[4..].starts_with("TRACE")),
            "{line:?}"
        );
    }
    // Not the journal (JOURNAL_STREAM inherited, stderr elsewhere): no prefix.
    let log = log_of(&["run"], &env, false, warned);
    assert!(
        log.lines().any(|l| l.starts_with("[WARN] database")),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with('<')),
        "a priority outside the journal:\n{log}"
    );
    // `check` as ExecStartPre: its lines on stdout carry priorities too.
    let check_env = [
        (
            "BZPUSH_DATABASE_URL",
            format!("mysql://bugs@{}/bugs", closed_port()),
        ),
        ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
    ];
    let log = log_of(&["check", "run"], &check_env, true, |log| {
        log.contains("FAIL")
    });
    assert!(log.starts_with("<6>ok    configuration: valid\n"), "{log}");
    assert!(log.contains("\n<3>FAIL  database "), "{log}");
    let log = log_of(&["check", "run"], &check_env, false, |log| {
        log.contains("FAIL")
    });
    assert!(log.starts_with("ok    configuration: valid\n"), "{log}");
    // A configuration error comes before logging starts, at priority 3 too.
    let bad = [("BZPUSH_POLL_INTERVAL", "soon".to_string())];
    let log = log_of(&["run"], &bad, true, |log| !log.is_empty());
    assert!(log.starts_with("<3>bzpush: BZPUSH_POLL_INTERVAL"), "{log}");
}

// ---- secrets in what bzpush prints ----

/// Every URL setting, each command that reads it, and passwords holding
/// each character that must be percent-encoded: exit 2, the setting named,
/// the password nowhere in stdout or stderr.
#[test]
fn no_url_setting_prints_its_password() {
    let settings = [
        (
            "BZPUSH_DATABASE_URL",
            "mysql://bzpush:{}@127.0.0.1:3306/bugs",
            &["run", "poll"][..],
        ),
        (
            "BZPUSH_AMQP_URL",
            "amqp://bzpush:{}@127.0.0.1:5672/%2f",
            &["poll", "serve"][..],
        ),
        (
            "BZPUSH_CATCHUP_DATABASE_URL",
            "mysql://bzpush:{}@127.0.0.1:3306/bugs",
            &["serve"][..],
        ),
    ];
    let passwords = [
        "se/cr3t",
        "se#cr3t",
        "se?cr3t",
        "se@cr3t",
        "se:cr3t@x",
        "se/cr@t:x#y",
    ];
    for (variable, template, commands) in settings {
        for password in passwords {
            let value = template.replace("{}", password);
            for command in commands {
                for args in [vec!["check", command], vec![command]] {
                    let env = [(variable, value.clone())];
                    let finished = Bzpush::run(&args, &env, Duration::from_secs(30));
                    let printed = format!("{}{}", finished.stdout, finished.stderr);
                    assert_eq!(
                        finished.status.code(),
                        Some(2),
                        "{args:?} {variable}={value}: {printed}"
                    );
                    assert!(printed.contains(variable), "{printed}");
                    assert!(printed.contains("%2F %23 %3F %40 %3A"), "{printed}");
                    for secret in ["cr3t", "cr@t"] {
                        assert!(
                            !printed.contains(secret),
                            "{args:?} {variable}={value} printed the password: {printed}"
                        );
                    }
                }
            }
        }
    }
}

/// Settings for one run of the binary.
type Env = Vec<(&'static str, String)>;

/// A valid URL whose password is percent-encoded, to a server that is not
/// there: neither `check` nor the running process shows the password,
/// encoded or decoded.
#[test]
fn connection_errors_do_not_print_the_password() {
    let (encoded, decoded) = ("s3%2Fcr%40t%3Ax", "s3/cr@t:x");
    let database = format!("mysql://bzpush:{encoded}@{}/bugs", closed_port());
    let broker = format!("amqp://bzpush:{encoded}@{}/%2f", closed_port());
    let runs: [(&[&str], Env); 3] = [
        (
            &["check", "run"],
            vec![
                ("BZPUSH_DATABASE_URL", database.clone()),
                ("BZPUSH_LISTEN", "127.0.0.1:0".into()),
            ],
        ),
        (
            &["check", "poll"],
            vec![
                ("BZPUSH_DATABASE_URL", database.clone()),
                ("BZPUSH_AMQP_URL", broker.clone()),
            ],
        ),
        (
            &["check", "serve"],
            vec![
                ("BZPUSH_CATCHUP_DATABASE_URL", database.clone()),
                ("BZPUSH_AMQP_URL", broker.clone()),
                ("BZPUSH_LISTEN", "127.0.0.1:0".into()),
            ],
        ),
    ];
    for (args, env) in &runs {
        let finished = Bzpush::run(args, env, Duration::from_secs(60));
        let printed = format!("{}{}", finished.stdout, finished.stderr);
        eprintln!("{args:?}:\n{printed}");
        assert_eq!(finished.status.code(), Some(1), "{printed}");
        assert!(printed.contains("bzpush:***@"), "{printed}");
        assert!(
            !printed.contains(encoded) && !printed.contains(decoded),
            "{printed}"
        );
    }
    // The running poller says the database is down, and names it redacted.
    let env = [
        ("BZPUSH_DATABASE_URL", database.clone()),
        ("BZPUSH_AMQP_URL", broker.clone()),
        ("BZPUSH_LOG", "trace".to_string()),
    ];
    let log = log_of(&["poll"], &env, false, |log| log.contains("WARN] database"));
    assert!(log.contains("WARN] database mysql://bzpush:***@"), "{log}");
    assert!(!log.contains(encoded) && !log.contains(decoded), "{log}");
}

// ---- localhost is the Unix socket ----

#[test]
fn host_localhost_is_the_unix_socket_and_access_denied_names_the_host_tried() {
    let db = TestDb::new();
    let user = TestUser::at_host("localhost", &[format!("SELECT ON `{}`.*", db.name)]);
    let url = |host: &str, query: &str| {
        format!(
            "mysql://{}:{}@{host}/{}{query}",
            user.name, user.password, db.name
        )
    };
    let check_url = |url: String| {
        let finished = check(
            "run",
            &[
                ("BZPUSH_DATABASE_URL", url),
                ("BZPUSH_SOURCE", "bugs".to_string()),
                ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
            ],
        );
        assert!(!finished.stdout.contains(&user.password));
        finished
    };
    // This machine's MariaDB skips name resolution: 'u'@'localhost' is a
    // socket login only.
    let finished = check_url(url("localhost", ""));
    assert!(
        finished.stdout.contains("reachable over Unix socket /"),
        "{}",
        finished.stdout
    );
    assert_eq!(finished.status.code(), Some(0), "{}", finished.stdout);
    // A socket named in the URL is the one used.
    let socket = bzpush::database::SOCKET_PATHS
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("MariaDB's socket exists on this machine");
    let finished = check_url(url("localhost", &format!("?socket={socket}")));
    assert!(
        finished
            .stdout
            .contains(&format!("reachable over Unix socket {socket}")),
        "{}",
        finished.stdout
    );
    let finished = check_url(url("localhost", "?socket=/nonexistent/mysqld.sock"));
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stdout);
    assert!(
        finished.stdout.contains("/nonexistent/mysqld.sock"),
        "{}",
        finished.stdout
    );
    // Over TCP, the server sees 127.0.0.1, and the account does not match.
    let finished = check_url(url(MYSQL_ADDR, ""));
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stdout);
    let fail = finished
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL  database"))
        .unwrap_or_else(|| panic!("no database FAIL line:\n{}", finished.stdout));
    assert!(
        fail.contains(&format!("'{}'@'127.0.0.1'", user.name)),
        "{fail}"
    );
    assert!(fail.contains("TCP login from 127.0.0.1"), "{fail}");
    assert!(fail.contains("use host localhost"), "{fail}");
    // The running poller says the same in its log.
    let env = [
        ("BZPUSH_DATABASE_URL", url(MYSQL_ADDR, "")),
        ("BZPUSH_SOURCE", "bugs".to_string()),
        ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
    ];
    let log = log_of(&["run"], &env, false, |log| log.contains("WARN] database"));
    assert!(
        log.contains(&format!("'{}'@'127.0.0.1'", user.name)),
        "{log}"
    );
    assert!(log.contains("TCP login from 127.0.0.1"), "{log}");
    assert!(!log.contains(&user.password), "{log}");
}

// ---- allowed origins ----

/// A WebSocket handshake from a browser at `origin`: `Ok` once it is a
/// working connection (a `version` command answered), else the HTTP status.
fn connect_from(addr: &str, origin: Option<&str>) -> Result<(), u16> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/")
        .into_client_request()
        .expect("a request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().expect("a header value"));
    }
    let socket = TcpStream::connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    match tungstenite::client(request, socket) {
        Ok((mut ws, _)) => {
            ws.send(tungstenite::Message::text(r#"{"command":"version"}"#))
                .expect("send");
            let answer = ws.read().expect("an answer");
            assert!(answer.to_string().contains("\"version\""), "{answer}");
            Ok(())
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("handshake from {origin:?}: {e}"),
    }
}

#[test]
fn allowed_origins_match_as_browsers_send_them_and_refusals_are_logged() {
    let db = TestDb::new();
    // Bugzilla's urlbase ends in /; hosts are written in any case.
    let allowed =
        "https://bugzilla.example.org/, https://Other.Example.ORG:443, http://localhost:8080";
    let server = Bzpush::run_on(&db, &[("BZPUSH_ALLOWED_ORIGINS", allowed.to_string())]);
    let addr = server.listen_addr();
    for origin in [
        "https://bugzilla.example.org",
        "https://other.example.org",
        "http://localhost:8080",
    ] {
        assert_eq!(connect_from(&addr, Some(origin)), Ok(()), "{origin}");
    }
    // Not a browser: no Origin, not restricted.
    assert_eq!(connect_from(&addr, None), Ok(()));
    // Refused, and logged once although refused three times.
    for _ in 0..3 {
        assert_eq!(connect_from(&addr, Some("https://evil.example")), Err(403));
    }
    assert_eq!(
        connect_from(&addr, Some("http://bugzilla.example.org")),
        Err(403)
    );
    let line = "refused a WebSocket handshake from origin \"https://evil.example\"";
    assert!(
        server.wait_for_log(line, Duration::from_secs(30)),
        "{}",
        server.log()
    );
    assert!(server.wait_for_log(
        "origin \"http://bugzilla.example.org\"",
        Duration::from_secs(30)
    ));
    assert_eq!(server.log().matches(line).count(), 1, "{}", server.log());
    // check shows the origins as they are compared.
    let finished = check(
        "run",
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
            ("BZPUSH_ALLOWED_ORIGINS", allowed.to_string()),
        ],
    );
    assert!(
        finished.stdout.contains(
            "allowed origins: https://bugzilla.example.org, https://other.example.org, http://localhost:8080"
        ),
        "{}",
        finished.stdout
    );
    // An entry that can never match stops bzpush, naming the setting.
    let finished = Bzpush::run(
        &["run"],
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            (
                "BZPUSH_ALLOWED_ORIGINS",
                "https://bugzilla.example.org/bugzilla/".to_string(),
            ),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(finished.status.code(), Some(2), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("BZPUSH_ALLOWED_ORIGINS"),
        "{}",
        finished.stderr
    );
}
