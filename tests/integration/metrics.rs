//! `/metrics` as Prometheus expects it: only the metrics that apply to the
//! subcommand, a build-info gauge, a start time, and a poll lag that is the
//! live age of what the poller owes, so "alert if it grows" can fire while
//! the database is down. Also the alert rules and the dashboard in
//! `contrib/`: promtool accepts the rules, and every metric they and the
//! dashboard name is one bzpush exports.

use crate::util;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::util::serve::http_get;
use crate::util::{Bzpush, Proxy, TestBroker, TestDb, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// The value of the sample `name` (labels included) as a float.
fn sample(addr: &str, name: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
}

/// The metric families `/metrics` declares.
fn families(addr: &str) -> BTreeSet<String> {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn run_exports_poller_metrics_and_a_lag_that_grows_while_the_database_is_down() {
    let db = TestDb::new();
    let proxy = Proxy::to(util::MYSQL_ADDR);
    let server = Bzpush::run_on(&db, &[("BZPUSH_DATABASE_URL", db.url_at(&proxy.addr()))]);
    server.wait_healthy();
    let addr = server.listen_addr();

    let names = families(&addr);
    for name in [
        "bzpush_poll_lag_seconds",
        "bzpush_poll_batches_total",
        "bzpush_database_up",
        "bzpush_build_info",
        "bzpush_uptime_seconds",
        "process_start_time_seconds",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    for name in [
        "bzpush_broker_reconnects_total",
        "bzpush_poison_messages_total",
    ] {
        assert!(!names.contains(name), "{name} in run's {names:?}");
    }
    let version = format!(
        "bzpush_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&addr, &version), 1.0);
    assert!(sample(&addr, "process_start_time_seconds") > 1.7e9);
    // Polling every 100 ms with nothing to do: the lag stays small.
    assert!(
        wait_until(WAIT, || sample(&addr, "bzpush_poll_lag_seconds") < 5.0),
        "lag {} while caught up",
        sample(&addr, "bzpush_poll_lag_seconds")
    );

    proxy.set_down(true);
    proxy.sever();
    assert!(
        wait_until(WAIT, || sample(&addr, "bzpush_database_up") == 0.0),
        "the database never counted as down"
    );
    let down = sample(&addr, "bzpush_poll_lag_seconds");
    assert!(
        wait_until(WAIT, || sample(&addr, "bzpush_poll_lag_seconds")
            > down + 1.5),
        "the lag stayed at {down} while the database was down"
    );

    proxy.set_down(false);
    assert!(
        wait_until(WAIT, || sample(&addr, "bzpush_poll_lag_seconds") < 5.0),
        "the lag did not recover: {}",
        sample(&addr, "bzpush_poll_lag_seconds")
    );
}

#[test]
fn serve_exports_no_poller_metrics() {
    let broker = TestBroker::new();
    let server = Bzpush::serve(&broker, &[]);
    server.wait_healthy();
    let names = families(&server.listen_addr());
    for name in [
        "bzpush_broker_up",
        "bzpush_broker_reconnects_total",
        "bzpush_build_info",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    for name in [
        "bzpush_poll_lag_seconds",
        "bzpush_poll_batches_total",
        "bzpush_database_up",
    ] {
        assert!(!names.contains(name), "{name} in serve's {names:?}");
    }
}

fn contrib(path: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// Every `bzpush_…` or `process_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["bzpush_", "process_start_time_seconds"] {
        for (at, _) in text.match_indices(prefix) {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let (path, _) = contrib("prometheus/bzpush-rules.yml");
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool checks the rules ({e}): run ./test, which installs it")
        });
    assert!(
        output.status.success(),
        "promtool refused {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_rules_and_the_dashboard_name_only_exported_metrics() {
    let db = TestDb::new();
    let run = Bzpush::run_on(&db, &[]);
    run.wait_healthy();
    let broker = TestBroker::new();
    let serve = Bzpush::serve(&broker, &[]);
    serve.wait_healthy();
    let mut exported = families(&run.listen_addr());
    exported.extend(families(&serve.listen_addr()));
    // The poller's role gauge (issue 9): 1 active, 0 standby.
    exported.insert("bzpush_poller_active".to_string());

    let (_, rules) = contrib("prometheus/bzpush-rules.yml");
    let (_, dashboard) = contrib("grafana/bzpush-dashboard.json");
    let dashboard_json: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<&str> = dashboard_json["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets"))
        .map(|t| t["expr"].as_str().expect("expr"))
        .collect();
    assert!(!exprs.is_empty());
    for (what, text) in [("rules", rules), ("dashboard", exprs.join("\n"))] {
        let named = metric_names(&text);
        assert!(!named.is_empty(), "{what} names no metric");
        for name in &named {
            assert!(
                exported.contains(name),
                "{what} names {name}, which /metrics does not export: {exported:?}"
            );
        }
    }
}
