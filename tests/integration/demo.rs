//! `bzpush demo` and the live page end to end (README, "See it work"): the real
//! binary, real WebSocket clients, the real MariaDB for the scratch
//! database, Debian's headless Chromium for the page, directly and behind
//! nginx configured with the README's block.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::util::demo::{
    Browser, Demo, Nginx, chromium_until_updates, readme_nginx_block, shown_updates,
};
use crate::util::run::TestUser;
use crate::util::serve::{Client, http_get};
use crate::util::{Bzpush, MYSQL_ADDR, admin_conn, test_account_url, wait_until};
use mysql::prelude::Queryable;
use serde_json::{Value, json};

/// Generous: the simulated Bugzilla changes a bug or two every 500 ms.
const WAIT: Duration = Duration::from_secs(30);

fn demo_bugs() -> Vec<u32> {
    (1..=20).collect()
}

/// Reads updates until one has a `when` later than `after` (any, if
/// `None`); returns `(bug, when)`.
fn next_update(client: &mut Client, after: Option<&str>) -> (u64, String) {
    let deadline = Instant::now() + WAIT;
    while let Some(msg) = client.try_recv(deadline.saturating_duration_since(Instant::now())) {
        if msg["command"] == "update" {
            let when = msg["when"].as_str().expect("when is a string").to_string();
            if after.is_none_or(|a| when.as_str() > a) {
                return (msg["bug"].as_u64().expect("bug is a number"), when);
            }
        }
    }
    panic!("no update (after {after:?}) within {WAIT:?}")
}

/// A subscriber to every demo bug gets updates; `since` a time the server
/// saw is answered in full from its cache, and one from before it started
/// is `partial`; the process prints exactly its address and exits 0 on
/// SIGTERM.
fn updates_since_and_partial(demo: &Demo, partial_expected: bool) {
    let mut client = Client::connect(&demo.ws_url());
    let answer = client.request(json!({"command": "subscribe", "bugs": demo_bugs()}));
    assert_eq!(answer["result"], "ok", "{answer}");
    let (_, first) = next_update(&mut client, None);
    // The cache vouches from its start plus a clock margin of a couple of
    // seconds; changes come every half second: take one past that, the
    // last that came meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let (mut bug, mut when) = next_update(&mut client, Some(&first));
    while let Some(update) = client.try_recv(Duration::from_millis(100)) {
        bug = update["bug"].as_u64().expect("bug is a number");
        when = update["when"]
            .as_str()
            .expect("when is a string")
            .to_string();
    }

    // `since` a time the server has seen since it started: complete.
    let mut late = Client::connect(&demo.ws_url());
    let answer =
        late.request(json!({"command": "subscribe", "bugs": [bug], "since": when.clone()}));
    assert_eq!(answer["result"], "ok", "{answer}");
    assert_ne!(answer["partial"], true, "{answer}");
    // The change at `when`, or a later one of the bug (a database answers
    // each bug's latest).
    let caught_up = late.recv(WAIT);
    assert_eq!(caught_up["bug"], bug, "{caught_up}");
    assert!(
        caught_up["when"]
            .as_str()
            .is_some_and(|w| w >= when.as_str()),
        "{caught_up} since {when}"
    );
    assert_eq!(caught_up["command"], "update");

    // `since` long before the demo started.
    let mut old = Client::connect(&demo.ws_url());
    let answer =
        old.request(json!({"command": "subscribe", "bugs": [bug], "since": "2000-01-01T00:00:00"}));
    assert_eq!(answer["result"], "ok", "{answer}");
    assert_eq!(answer["partial"] == true, partial_expected, "{answer}");
}

/// A counter or gauge of `/metrics`, by its name without labels.
fn metric(demo: &Demo, name: &str) -> f64 {
    let (status, body) = http_get(&demo.addr(), "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}

/// In memory the demo runs `run`'s real poller loop on a simulated
/// `push_notify` table: `/health` shows an active poller on a database
/// that is up, `/metrics` the poller's batches growing.
#[test]
fn demo_in_memory_polls_a_simulated_database_with_since_and_partial() {
    let demo = Demo::start(
        &["--poll-interval", "200ms"],
        &[("BZPUSH_LISTEN", "127.0.0.1:0".to_string())],
    );
    let health = || -> (u16, Value) {
        let (status, body) = http_get(&demo.addr(), "/health");
        (status, serde_json::from_str(&body).expect("JSON"))
    };
    // Active once it holds the lock; the database shows up once its first
    // poll went through.
    assert!(
        wait_until(WAIT, || {
            let (status, json) = health();
            status == 200 && json["poller"] == "active"
        }),
        "the demo's poller never took its lock: {:?}\n{}",
        health(),
        demo.bzpush.log()
    );
    let (status, json) = health();
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["database"], "up", "{json}");
    assert_eq!(metric(&demo, "bzpush_poller_active"), 1.0);
    let batches = metric(&demo, "bzpush_poll_batches_total");
    assert!(
        wait_until(WAIT, || metric(&demo, "bzpush_poll_batches_total")
            > batches),
        "the poller hands on no batch"
    );
    assert!(
        demo.bzpush.log().contains("active: holding database lock"),
        "{}",
        demo.bzpush.log()
    );
    // In memory there is no database to vouch for a time before the start.
    updates_since_and_partial(&demo, true);
    let page_url = demo.page_url.clone();
    let (status, stdout) = demo.stop();
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        stdout,
        format!("{page_url}\n"),
        "stdout is the page's address only"
    );
}

#[test]
fn demo_with_a_database_polls_its_scratch_database_and_drops_it() {
    let url = test_account_url(MYSQL_ADDR, "");
    let demo = Demo::start(
        &["--database-url", &url, "--poll-interval", "200ms"],
        &[("BZPUSH_LISTEN", "127.0.0.1:0".to_string())],
    );
    let log = demo.bzpush.log();
    let name = log
        .split("created scratch database ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("the demo names its scratch database:\n{log}"))
        .to_string();
    let exists = |name: &str| -> bool {
        let found: Vec<String> = admin_conn()
            .exec(
                "SELECT schema_name FROM information_schema.schemata WHERE schema_name = ?",
                (name,),
            )
            .expect("list databases");
        !found.is_empty()
    };
    assert!(exists(&name), "{name} exists while the demo runs");
    assert!(
        wait_until(WAIT, || http_get(&demo.addr(), "/health").0 == 200),
        "the demo's poller never reached its scratch database:\n{}",
        demo.bzpush.log()
    );
    // The poller reads the scratch push_notify; a `since` before the start
    // is answered from the scratch bugs table, not `partial`.
    updates_since_and_partial(&demo, false);
    let rows: u64 = admin_conn()
        .query_first(format!("SELECT COUNT(*) FROM `{name}`.bugs"))
        .expect("count the scratch bugs")
        .unwrap_or(0);
    assert_eq!(rows, 20);
    // The simulated Bugzilla is a consistent one: the audit of its
    // push_notify against bugs finds nothing missing.
    let log = demo.bzpush.log();
    assert!(!log.contains("[WARN]"), "{log}");
    let (_, metrics) = http_get(&demo.addr(), "/metrics");
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("bzpush_missed_changes_total"))
            .all(|l| l.ends_with(" 0")),
        "{metrics}"
    );
    let (status, _) = demo.stop();
    assert!(status.success(), "exit status {status}");
    assert!(!exists(&name), "{name} is dropped after SIGTERM");
}

/// `--database-url mysql://u:pw@localhost/` with an account
/// `'u'@'localhost'` only, as the README creates them: host `localhost` is
/// the Unix socket for the demo's own connection too (this machine's
/// MariaDB skips name resolution, so a TCP login would be refused), and a
/// refused login reads as a sentence.
#[test]
fn demo_on_localhost_uses_the_socket_and_says_errors_as_sentences() {
    let user = TestUser::at_host("localhost", &["ALL ON `bzpush\\_demo\\_%`.*".to_string()]);
    let url = format!("mysql://{}:{}@localhost/", user.name, user.password);
    let demo = Demo::start(
        &["--database-url", &url],
        &[("BZPUSH_LISTEN", "127.0.0.1:0".to_string())],
    );
    assert!(
        wait_until(WAIT, || http_get(&demo.addr(), "/health").0 == 200),
        "the demo's poller never reached its scratch database:\n{}",
        demo.bzpush.log()
    );
    let (status, _) = demo.stop();
    assert!(status.success(), "exit status {status}");

    let wrong = format!("mysql://{}:wrong@localhost/", user.name);
    let finished = Bzpush::run(
        &["demo", "--database-url", &wrong],
        &[("BZPUSH_LISTEN", "127.0.0.1:0".to_string())],
        WAIT,
    );
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("Access denied"),
        "{}",
        finished.stderr
    );
    for wrapper in ["MySqlError", "DriverError", "{", "}"] {
        assert!(!finished.stderr.contains(wrapper), "{}", finished.stderr);
    }
}

#[test]
fn demo_takes_a_free_port_when_the_default_one_is_busy() {
    // Held by this test, or already by someone else: busy either way.
    let _held = TcpListener::bind("127.0.0.1:8844");
    let demo = Demo::start(&[], &[]);
    assert_ne!(demo.addr(), "127.0.0.1:8844");
    assert!(demo.addr().starts_with("127.0.0.1:"), "{}", demo.page_url);
    let (status, page) = http_get(&demo.addr(), "/");
    assert_eq!(status, 200);
    assert!(page.contains("bzpush.js"), "{page}");
    let (status, _) = demo.stop();
    assert!(status.success());
}

#[test]
fn the_page_its_client_and_no_favicon_404() {
    let demo = Demo::start(
        &["--bugzilla-url", "https://bugzilla.example.org/"],
        &[("BZPUSH_LISTEN", "127.0.0.1:0".to_string())],
    );
    let (status, page) = http_get(&demo.addr(), "/");
    assert_eq!(status, 200);
    assert!(
        page.contains("<link rel=\"icon\" href=\"data:,\">"),
        "{page}"
    );
    assert!(
        page.contains("content=\"https://bugzilla.example.org\""),
        "{page}"
    );
    let (status, _) = http_get(&demo.addr(), "/favicon.ico");
    assert_eq!(status, 204);
    let (status, client) = http_get(&demo.addr(), "/bzpush.js");
    assert_eq!(status, 200);
    assert!(client.contains("class BzpushClient"), "{client}");
    let (status, _) = demo.stop();
    assert!(status.success());

    // What would break out of the page's HTML is refused up front.
    let refused = Bzpush::run(
        &["demo", "--bugzilla-url", "https://b.example/\"><script>"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains("BZPUSH_BUGZILLA_URL"),
        "{refused:?}"
    );
}

/// Debian's headless Chromium loads the page from a running demo, directly
/// and behind nginx with the README's `location /bzpush/` block, and the
/// page shows the demo's updates; behind nginx it connected through the
/// proxy's path.
#[test]
fn the_page_shows_updates_in_chromium_directly_and_behind_nginx() {
    let demo = Demo::start(
        &["--bugzilla-url", "https://bugzilla.example.org"],
        &[("BZPUSH_LISTEN", "127.0.0.1:0".to_string())],
    );
    // Once the server has an update in its cache, a page that subscribes
    // with `since` shows it at once, whenever the next change comes.
    let mut client = Client::connect(&demo.ws_url());
    client.request(json!({"command": "subscribe", "bugs": demo_bugs()}));
    next_update(&mut client, None);

    let dom = chromium_until_updates(&demo.page_url);
    let updates = shown_updates(&dom);
    assert!(
        updates.iter().all(|(bug, _)| demo_bugs().contains(bug)),
        "{updates:?}"
    );
    assert!(dom.contains(&format!("ws://{}/", demo.addr())), "{dom}");
    assert!(
        dom.contains("href=\"https://bugzilla.example.org/show_bug.cgi?id="),
        "bug numbers link to Bugzilla:\n{dom}"
    );
    assert!(
        dom.contains("database up"),
        "the page shows /health:\n{dom}"
    );
    assert!(
        dom.contains("the Bugzilla behind it is simulated"),
        "the demo's page says its Bugzilla is simulated:\n{dom}"
    );

    let block = readme_nginx_block();
    assert!(block.contains("location /bzpush/"), "{block}");
    assert!(block.contains("http://127.0.0.1:8844/"), "{block}");
    let nginx = Nginx::start(&block.replace("127.0.0.1:8844", &demo.addr()));
    let url = format!("http://{}/bzpush/", nginx.addr);
    let dom = chromium_until_updates(&url);
    assert!(
        dom.contains(&format!("ws://{}/bzpush/", nginx.addr)),
        "behind nginx the page connects under /bzpush/:\n{dom}"
    );
    assert!(dom.contains("class=\"ok\">connected"), "{dom}");
    assert!(!shown_updates(&dom).is_empty());
    let (status, _) = demo.stop();
    assert!(status.success());
}

/// `bzpush.js` in a real browser: the server goes away and the page says
/// why (close code 1001); a new server comes up on the same port and the
/// page reconnects by itself and resubscribes with `since` from the last
/// `when` it saw. The new server's cache starts after that time, so its
/// answer is `partial`, which the page shows (a resubscribe without
/// `since` would get no `partial`), and new updates follow.
#[test]
fn the_page_reconnects_and_resubscribes_with_since_in_chromium() {
    let listen = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("its address").to_string()
    };
    let first = Demo::start(&["--listen", &listen], &[]);
    let mut browser = Browser::open(&first.page_url);
    let updates = "document.querySelectorAll('#updates li.update').length";
    let partials = "document.querySelectorAll('#updates li.partial').length";
    let state = "document.getElementById('state').textContent";
    assert!(
        browser.wait_for(&format!("{updates} > 0"), WAIT),
        "no update shown; state: {}",
        browser.eval(state)
    );
    // Every text the state line shows, kept: the page says 1001 only until
    // its first retry (0.5 to 1 s later) is refused, which on a loaded
    // machine can come before `stop` returns.
    browser.eval(
        "window.shownStates = []; new MutationObserver(() => \
         window.shownStates.push(document.getElementById('state').textContent))\
         .observe(document.getElementById('state'), {childList: true, characterData: true, subtree: true})",
    );
    let (status, _) = first.stop();
    assert!(status.success());
    assert!(
        browser.wait_for("window.shownStates.some((s) => s.includes('1001'))", WAIT),
        "the page does not say why it disconnected: {}",
        browser.eval("JSON.stringify(window.shownStates)")
    );
    let before = browser.eval(partials);
    let newest = browser.eval(
        "[...document.querySelectorAll('#updates li.update')].map((li) => li.dataset.when).sort().pop()",
    );
    let newest = newest.as_str().expect("a when").to_string();

    let second = Demo::start(&["--listen", &listen], &[]);
    assert!(
        browser.wait_for(&format!("{partials} > {before}"), WAIT),
        "no partial after reconnecting (since not sent?); state: {}",
        browser.eval(state)
    );
    assert_eq!(browser.eval(state), "connected");
    assert!(
        browser.wait_for(
            &format!(
                "[...document.querySelectorAll('#updates li.update')].some((li) => li.dataset.when > '{newest}')"
            ),
            WAIT
        ),
        "no update after reconnecting"
    );
    let (status, _) = second.stop();
    assert!(status.success());
}

/// `bzpush.js` in a real browser, before it has seen any update: its
/// clock says nothing about the database's (it may be hours ahead), so it
/// sends no `since` of its own making, neither at first nor when it
/// resubscribes after a reconnect, and it emits `partial` for the bugs it
/// was subscribed to, which may have changed while it was away. The page's
/// `WebSocket.prototype.send` is wrapped to record what the client sent; it
/// subscribes to a bug the demo never changes, so no `when` ever arrives.
#[test]
fn a_client_that_saw_no_update_resubscribes_without_since_and_emits_partial_in_chromium() {
    let listen = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("its address").to_string()
    };
    let first = Demo::start(&["--listen", &listen], &[]);
    let mut browser = Browser::open(&first.page_url);
    assert!(
        browser.wait_for("typeof BzpushClient === 'function'", WAIT),
        "the page did not load bzpush.js"
    );
    let quiet_bug = 999_999;
    assert!(!demo_bugs().contains(&quiet_bug));
    browser.eval(&format!(
        "window.sent = [];
         const send = WebSocket.prototype.send;
         WebSocket.prototype.send = function (data) {{
           const message = JSON.parse(data);
           if ([].concat(message.bugs).includes({quiet_bug})) window.sent.push(message);
           return send.call(this, data);
         }};
         window.events = [];
         window.probe = new BzpushClient('ws://{listen}/', {{minDelay: 100, maxDelay: 500}});
         for (const type of ['open', 'close', 'update', 'partial']) {{
           probe.addEventListener(type, (e) => events.push({{type, detail: e.detail}}));
         }}
         probe.subscribe([{quiet_bug}]);
         true"
    ));
    let opened = "events.filter((e) => e.type === 'open').length";
    assert!(
        browser.wait_for(&format!("{opened} === 1 && sent.length === 1"), WAIT),
        "the probe did not subscribe: {}",
        browser.eval("JSON.stringify({events, sent})")
    );
    let (status, _) = first.stop();
    assert!(status.success());
    assert!(
        browser.wait_for("events.some((e) => e.type === 'close')", WAIT),
        "{}",
        browser.eval("JSON.stringify(events)")
    );

    let second = Demo::start(&["--listen", &listen], &[]);
    assert!(
        browser.wait_for("events.some((e) => e.type === 'partial')", WAIT),
        "no partial after reconnecting: {}",
        browser.eval("JSON.stringify({events, sent})")
    );
    let events = browser.eval("events");
    let partial = events
        .as_array()
        .and_then(|events| events.iter().find(|e| e["type"] == "partial"))
        .expect("a partial event");
    assert_eq!(partial["detail"]["bugs"], json!([quiet_bug]), "{events}");
    assert!(
        events
            .as_array()
            .is_some_and(|events| events.iter().all(|e| e["type"] != "update")),
        "{events}"
    );
    let sent = browser.eval("sent");
    let subscribes = sent.as_array().expect("a list of messages");
    assert_eq!(subscribes.len(), 2, "subscribed, then resubscribed: {sent}");
    for message in subscribes {
        assert_eq!(message["command"], "subscribe", "{sent}");
        assert!(
            message
                .get("since")
                .is_none_or(|since| since.is_null() || since == ""),
            "a since the server never sent: {sent}"
        );
    }
    let (status, _) = second.stop();
    assert!(status.success());
}
