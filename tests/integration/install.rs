//! The README's "Install on one VM", followed literally: its shell blocks
//! run in order, as written, against a temporary root.
//!
//! What the test changes, and only that: absolute paths under `/etc/` and
//! `/usr/bin/` point into the temporary root; commands that would change
//! the machine are shims on `PATH` (`cargo` does nothing: the binary under
//! test stands in for the release build; `systemctl` records its
//! arguments; `apt-get` unpacks the package with `dpkg-deb -x` when
//! `BZPUSH_TEST_DEB` names one, as `.ci/run` does after `cargo deb`;
//! `editor` writes the README's environment lines, with the test
//! database's URL for the example's). The script must succeed, and its
//! `bzpush check run --env-file …` must reach the database.

use crate::util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::TestDb;

/// A fenced block of the README: its language tag and its text.
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(tag)) => open = Some((tag.trim().to_string(), String::new())),
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

fn install_section() -> &'static str {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("\n## Install on one VM")
        .expect("README has a section \"Install on one VM\"");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |at| at + 3);
    &rest[..end]
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{text}\n")).expect("write a shim");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod a shim");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_readme_install_steps_work_as_written() {
    let db = TestDb::new();
    let temp = std::env::temp_dir().join(util::unique("bzpush-install"));
    let (root, checkout, shims) = (temp.join("root"), temp.join("checkout"), temp.join("shims"));
    for dir in [
        root.join("etc/systemd/system"),
        root.join("usr/bin"),
        checkout.join("systemd"),
        checkout.join("target/release"),
        checkout.join("target/debian"),
        shims.clone(),
    ] {
        std::fs::create_dir_all(&dir).expect("make the test's folders");
    }
    // The checkout the README's commands run in.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(manifest.join("systemd")).expect("read systemd/") {
        let entry = entry.expect("a systemd/ entry");
        std::fs::copy(
            entry.path(),
            checkout.join("systemd").join(entry.file_name()),
        )
        .expect("copy systemd/");
    }
    std::fs::copy(
        env!("CARGO_BIN_EXE_bzpush"),
        checkout.join("target/release/bzpush"),
    )
    .expect("the binary under test stands in for the release build");
    if let Ok(deb) = std::env::var("BZPUSH_TEST_DEB") {
        let name = Path::new(&deb).file_name().expect("a .deb file name");
        std::fs::copy(&deb, checkout.join("target/debian").join(name)).expect("copy the .deb");
    }

    // The environment lines the README tells the reader to write, with
    // the test database for the example's.
    let section = install_section();
    let blocks = blocks(section);
    let env_lines: String = blocks
        .iter()
        .filter(|(tag, _)| tag == "ini")
        .flat_map(|(_, text)| text.lines())
        .map(|line| match line.split_once('=') {
            Some(("BZPUSH_DATABASE_URL", _)) => format!("BZPUSH_DATABASE_URL={}\n", db.url()),
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(
        env_lines.contains("BZPUSH_DATABASE_URL="),
        "the install section shows the database line to write:\n{section}"
    );
    std::fs::write(temp.join("env-lines"), &env_lines).expect("write the env lines");

    let log = temp.join("systemctl.log");
    write_script(&shims.join("cargo"), "exit 0");
    write_script(
        &shims.join("systemctl"),
        &format!("echo \"$*\" >> '{}'", log.display()),
    );
    write_script(
        &shims.join("apt-get"),
        &format!(
            "for f in \"$@\"; do case \"$f\" in *.deb) [ -f \"$f\" ] && dpkg-deb -x \"$f\" '{}';; esac; done; exit 0",
            root.display()
        ),
    );
    write_script(
        &shims.join("editor"),
        &format!("cat '{}' >> \"$1\"", temp.join("env-lines").display()),
    );

    let script: String = blocks
        .iter()
        .filter(|(tag, _)| tag == "sh")
        .map(|(_, text)| text.as_str())
        .collect();
    assert!(
        script.contains("bzpush check run --env-file /etc/bzpush/bzpush.env"),
        "the install section checks the environment file:\n{script}"
    );
    let script = script
        .replace(" /etc/", &format!(" {}/etc/", root.display()))
        .replace(" /usr/bin/", &format!(" {}/usr/bin/", root.display()));
    let path = format!(
        "{}:{}:{}",
        shims.display(),
        root.join("usr/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("timeout");
    command
        .args(["120", "bash", "-euxo", "pipefail", "-c", &script])
        .current_dir(&checkout)
        .env("PATH", path);
    for (key, _) in std::env::vars() {
        if key.starts_with("BZPUSH_") {
            command.env_remove(key);
        }
    }
    let output = command.output().expect("run bash");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "the install steps failed:\n{stdout}\n{stderr}"
    );
    // As check shows it: without the test account's password.
    let shown = db.url().replace(util::TEST_PASSWORD, "***");
    assert!(
        stdout.contains(&format!("ok    database {shown}: reachable")),
        "check read the environment file and reached the database:\n{stdout}\n{stderr}"
    );
    let env_file = root.join("etc/bzpush/bzpush.env");
    assert_eq!(mode(&env_file), 0o600, "{}", env_file.display());
    assert_eq!(mode(&root.join("usr/bin/bzpush")), 0o755);
    let systemctl = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        systemctl.contains("enable --now bzpush-run"),
        "systemctl calls: {systemctl}"
    );
    let _ = std::fs::remove_dir_all(&temp);
}

/// A password on a command line lands in shell history and in every
/// process list: no command the README gives carries one.
#[test]
fn no_readme_command_puts_a_password_on_the_command_line() {
    for (tag, text) in blocks(include_str!("../../README.md")) {
        if tag != "sh" {
            continue;
        }
        for line in text.lines() {
            let command = line.split(" #").next().unwrap_or_default();
            let credentials = command.split("://").skip(1).any(|rest| {
                let authority = rest.split('/').next().unwrap_or_default();
                authority
                    .rsplit_once('@')
                    .is_some_and(|(userinfo, _)| userinfo.contains(':'))
            });
            assert!(!credentials, "a password on a command line: {line}");
        }
    }
}

/// The README's path for a stock Bugzilla, followed as written on a
/// database that has Bugzilla's `bugs` table and nothing of the PushNotify
/// extension: its first SQL block (the account and its one grant; only the
/// names are the test's own: a unique user, any host, the test database),
/// its environment lines (the URL pointing there), `check run`, then `run`
/// delivering a change made the way Bugzilla makes it.
#[test]
fn a_stock_bugzilla_on_the_readmes_path_passes_check_and_delivers_a_change() {
    use crate::util::serve::Client;
    use mysql::prelude::Queryable;
    use serde_json::json;

    let db = TestDb::new();
    db.conn()
        .query_drop("DROP TABLE push_notify")
        .expect("a stock Bugzilla has no push_notify");
    let section = install_section();
    let grants = blocks(section)
        .into_iter()
        .find(|(tag, _)| tag == "sql")
        .map(|(_, text)| text)
        .expect("the install section's first SQL block");
    assert!(
        !grants.contains("push_notify"),
        "the stock path needs no extension:\n{grants}"
    );
    let user = util::unique("bz");
    let password = util::unique("Secret");
    let sql = grants
        .replace("'bzpush'@'localhost'", &format!("'{user}'@'%'"))
        .replace("'a long random password'", &format!("'{password}'"))
        .replace(" bugs.bugs ", &format!(" `{}`.bugs ", db.name));
    let mut admin = util::admin_conn();
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        admin
            .query_drop(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let url = format!("mysql://{user}:{password}@{}/{}", util::MYSQL_ADDR, db.name);
    let env_lines: String = blocks(section)
        .iter()
        .filter(|(tag, _)| tag == "ini")
        .flat_map(|(_, text)| text.lines())
        .map(|line| match line.split_once('=') {
            Some(("BZPUSH_DATABASE_URL", _)) => format!("BZPUSH_DATABASE_URL={url}\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    let temp = std::env::temp_dir().join(util::unique("bzpush-stock"));
    std::fs::create_dir_all(&temp).expect("make the test's folder");
    let env_file = temp.join("bzpush.env");
    std::fs::write(
        &env_file,
        format!(
            "{env_lines}BZPUSH_LISTEN=127.0.0.1:0\nBZPUSH_LOCK_NAME=bzpush.{}\n",
            db.name
        ),
    )
    .expect("write the environment file");
    let env_file = env_file.to_string_lossy().into_owned();

    let checked = util::Bzpush::run(
        &["check", "run", "--env-file", &env_file],
        &[],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(checked.status.code(), Some(0), "{}", checked.stdout);
    assert!(
        checked.stdout.contains("source bugs (the default)"),
        "{}",
        checked.stdout
    );
    assert!(
        !checked.stdout.contains("warn "),
        "nothing to warn about on the stock path:\n{}",
        checked.stdout
    );

    let server = util::Bzpush::start(&["run", "--env-file", &env_file], &[]);
    assert!(server.wait_listening(std::time::Duration::from_secs(20)));
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [42]}))["result"],
        "ok"
    );
    let (stamp, when) = db.stamp(0);
    db.set_bug(42, &stamp);
    assert_eq!(
        client.recv(std::time::Duration::from_secs(20)),
        json!({"command": "update", "bug": 42, "when": when}),
        "{}",
        server.log()
    );
    let (status, health) = crate::util::serve::health(&server);
    assert_eq!(status, 200, "{health}");
    assert!(
        health.get("warnings").is_none(),
        "nothing to warn about on the stock path: {health}"
    );
    assert!(!server.log().contains("[WARN]"), "{}", server.log());
    let _ = admin.query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"));
    let _ = std::fs::remove_dir_all(&temp);
}

/// An install upgraded from a version whose default source was
/// `push_notify` keeps its grants on that table: with `BZPUSH_SOURCE` unset
/// it now reads `bugs`, and `check`, the log and `/health` say so. An
/// account that may not read `push_notify` never emptied it: the README's
/// one grant on `bugs` is answered "denied" for a table that is there and
/// one that is not alike, and warns of nothing.
#[test]
fn only_an_account_that_reads_push_notify_is_told_it_is_left_alone() {
    use mysql::prelude::Queryable;

    let db = TestDb::new();
    let user = util::unique("bz");
    let password = util::unique("Secret");
    let mut admin = util::admin_conn();
    admin
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"
        ))
        .expect("create the account");
    admin
        .query_drop(format!(
            "GRANT SELECT (bug_id, delta_ts) ON `{}`.bugs TO '{user}'@'%'",
            db.name
        ))
        .expect("the README's grant");
    let env = [
        (
            "BZPUSH_DATABASE_URL",
            format!("mysql://{user}:{password}@{}/{}", util::MYSQL_ADDR, db.name),
        ),
        ("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name)),
        ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
    ];
    let check = || {
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
        util::Bzpush::run(&["check", "run"], &env, std::time::Duration::from_secs(30)).stdout
    };
    const LEFT_ALONE: &str = "leaves push_notify alone";
    let denied = check();
    assert!(!denied.contains(LEFT_ALONE), "{denied}");

    admin
        .query_drop(format!(
            "GRANT SELECT, DELETE ON `{}`.push_notify TO '{user}'@'%'",
            db.name
        ))
        .expect("the old default's grant");
    let upgraded = check();
    assert!(upgraded.contains(LEFT_ALONE), "{upgraded}");
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    let server = util::Bzpush::start(&["run"], &env);
    assert!(server.wait_listening(std::time::Duration::from_secs(20)));
    assert!(
        util::wait_until(std::time::Duration::from_secs(20), || {
            crate::util::serve::health(&server).1["warnings"]
                .to_string()
                .contains(LEFT_ALONE)
        }),
        "{}",
        server.log()
    );
    assert!(server.wait_for_log(LEFT_ALONE, std::time::Duration::from_secs(5)));
    let _ = admin.query_drop(format!("DROP USER IF EXISTS '{user}'@'%'"));
}
