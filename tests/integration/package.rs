//! The Debian package: the man page it ships agrees with the settings
//! table, and the `.deb` itself (built by `cargo deb`) holds the right
//! files with the right modes, marks the environment file as a conffile,
//! its units verify against its own binary, and its maintainer scripts
//! reload systemd, stop the units on removal, remove the configuration on
//! purge, and never enable or start a unit.
//!
//! The `.deb` checks need the package, which takes a release build:
//! `.ci/run` builds it once after the tests and runs them with
//! `BZPUSH_TEST_DEB=target/debian/bzpush_….deb cargo test --test integration
//! -- --include-ignored package::`. Run that way without the variable they fail
//! saying how to build it.

use std::path::{Path, PathBuf};
use std::process::Command;

use bzpush::config::SETTINGS;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_man_page_is_current_and_lists_every_setting() {
    let path = manifest_dir().join("doc/bzpush.1");
    let page = bzpush::manual::render();
    if std::env::var_os("BZPUSH_WRITE_MAN").is_some() {
        std::fs::write(&path, &page).expect("write doc/bzpush.1");
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == page,
        "doc/bzpush.1 differs from the settings table: \
         BZPUSH_WRITE_MAN=1 cargo test --test integration package::the_man rewrites it"
    );
    for setting in SETTINGS {
        let var = setting.env_var().replace('-', "\\-");
        let flag = format!("\\-\\-{}", setting.name.replace('-', "\\-"));
        assert!(
            page.contains(&format!(".BR {var} \", \" {flag}\n")),
            "{var}"
        );
        if let Some(range) = setting.range.describe() {
            assert!(page.contains(&range.replace('-', "\\-")), "{var}: {range}");
        }
    }
}

/// The `.deb` under test.
fn deb() -> PathBuf {
    let deb = std::env::var("BZPUSH_TEST_DEB").unwrap_or_else(|_| {
        panic!(
            "BZPUSH_TEST_DEB names no package: build one with `cargo install cargo-deb && \
             cargo deb`, then BZPUSH_TEST_DEB=target/debian/bzpush_….deb (.ci/run does this)"
        )
    });
    let deb = PathBuf::from(deb);
    assert!(deb.is_file(), "{} is not a file", deb.display());
    deb
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let output = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap_or_else(|e| panic!("dpkg-deb ({e}): apt-get install dpkg"));
    assert!(
        output.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
#[ignore = "needs a .deb: .ci/run builds one and runs this"]
fn the_package_holds_the_binary_units_man_page_and_a_private_conffile() {
    let deb = deb();
    let listing = dpkg_deb(&["-c"], &deb);
    // (mode, path) of each file that must be there, all owned by root.
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/bzpush"),
        ("-rw-r--r--", "./usr/lib/systemd/system/bzpush-run.service"),
        ("-rw-r--r--", "./usr/lib/systemd/system/bzpush-poll.service"),
        (
            "-rw-r--r--",
            "./usr/lib/systemd/system/bzpush-serve@.service",
        ),
        ("-rw-------", "./etc/bzpush/bzpush.env"),
        ("-rw-r--r--", "./usr/share/doc/bzpush/README.md"),
        ("-rw-r--r--", "./usr/share/doc/bzpush/doc/protocol.md"),
        (
            "-rw-r--r--",
            "./usr/share/doc/bzpush/contrib/bzpush-rules.yml",
        ),
        (
            "-rw-r--r--",
            "./usr/share/doc/bzpush/contrib/bzpush-dashboard.json",
        ),
        (
            "-rw-r--r--",
            "./usr/share/doc/bzpush/contrib/90-bzpush-sysctl.conf",
        ),
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"));
        assert!(line.starts_with(mode), "{path}: {line}");
        assert!(line.contains(" 0/0 "), "not owned by root: {line}");
    }
    assert!(
        listing.contains("./usr/share/man/man1/bzpush.1"),
        "no man page:\n{listing}"
    );

    let control = tempdir("control");
    dpkg_deb_unpack("-e", &deb, &control);
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
    assert_eq!(conffiles.trim(), "/etc/bzpush/bzpush.env");
    let info = dpkg_deb(&["-I"], &deb);
    assert!(info.contains("Package: bzpush"), "{info}");
    assert!(info.contains("Depends:"), "{info}");
    let synopsis = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Description: "))
        .unwrap_or_else(|| panic!("no description:\n{info}"));
    assert!(
        synopsis.len() <= 80,
        "a synopsis over 80 characters: {synopsis}"
    );

    // The binary is stripped: no debug sections.
    let root = tempdir("root");
    dpkg_deb_unpack("-x", &deb, &root);
    let sections = Command::new("readelf")
        .args(["--section-headers", "--wide"])
        .arg(root.join("usr/bin/bzpush"))
        .output()
        .expect("readelf (binutils)");
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(!sections.contains(".debug_"), "not stripped:\n{sections}");
    let _ = std::fs::remove_dir_all(&control);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
#[ignore = "needs a .deb: .ci/run builds one and runs this"]
fn the_packaged_units_verify_against_the_packaged_binary() {
    let deb = deb();
    let root = tempdir("verify");
    // verify --root resolves ExecStart= and the units' dependencies
    // (sysinit.target, …) inside the root: give it this machine's units,
    // then the package on top, so the packaged binary is the one checked.
    std::fs::create_dir_all(root.join("lib/systemd")).expect("make lib/systemd");
    let status = Command::new("cp")
        .args(["-a", "/lib/systemd/system"])
        .arg(root.join("lib/systemd/"))
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "copy /lib/systemd/system: run ./test, which installs systemd"
    );
    dpkg_deb_unpack("-x", &deb, &root);
    for unit in [
        "bzpush-run.service",
        "bzpush-poll.service",
        "bzpush-serve@.service",
    ] {
        // A template verifies as one of its instances.
        let instance = unit.replace("@.", "@test.");
        let dir = root.join("usr/lib/systemd/system");
        if instance != unit {
            std::fs::copy(dir.join(unit), dir.join(&instance)).expect("copy the template");
        }
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(dir.join(&instance))
            .output()
            .unwrap_or_else(|e| panic!("systemd-analyze ({e}): run ./test, which installs it"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && text.trim().is_empty(),
            "{unit} does not verify in the package:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The package's maintainer scripts, run as dpkg runs them for an install,
/// an upgrade, a removal and a purge, against a temporary root that has
/// systemd running (`/run/systemd/system`) and the configuration, state and
/// an enabled `bzpush-serve@` instance a purge must remove. `systemctl`,
/// `deb-systemd-helper` and `deb-systemd-invoke` are shims that record
/// their arguments: a unit is never enabled or started, an install reloads
/// systemd, a removal stops every unit and keeps the configuration.
#[test]
#[ignore = "needs a .deb: .ci/run builds one and runs this"]
fn the_maintainer_scripts_reload_stop_and_purge_but_never_enable_or_start() {
    let deb = deb();
    let dir = tempdir("scripts");
    let (control, root, shims) = (dir.join("control"), dir.join("root"), dir.join("shims"));
    dpkg_deb_unpack("-e", &deb, &control);
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    for made in [
        root.join("run/systemd/system"),
        root.join("etc/bzpush"),
        root.join("var/lib/private/bzpush"),
        root.join("usr/bin"),
        wants.clone(),
        shims.clone(),
    ] {
        std::fs::create_dir_all(&made).expect("make the test's folders");
    }
    std::fs::write(root.join("etc/bzpush/bzpush.env"), "").expect("an env file");
    std::fs::write(root.join("etc/bzpush/serve-a.env"), "").expect("a serve env file");
    std::os::unix::fs::symlink("private/bzpush", root.join("var/lib/bzpush"))
        .expect("the state directory's link");
    let instance = wants.join("bzpush-serve@a.service");
    std::os::unix::fs::symlink("/usr/lib/systemd/system/bzpush-serve@.service", &instance)
        .expect("an enabled instance");

    let log = dir.join("calls.log");
    for shim in ["systemctl", "deb-systemd-invoke", "deb-systemd-helper"] {
        // deb-systemd-helper answers no to debian-installed and was-enabled:
        // nothing was enabled before.
        let script = format!(
            "#!/bin/sh\necho \"{shim} $*\" >> '{}'\ncase \"$*\" in *debian-installed*|*was-enabled*) exit 1;; esac\n",
            log.display()
        );
        for at in [shims.join(shim), root.join("usr/bin").join(shim)] {
            std::fs::write(&at, &script).expect("write a shim");
            std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod a shim");
        }
    }
    let run = |script: &str, args: &[&str]| -> String {
        let text = std::fs::read_to_string(control.join(script))
            .unwrap_or_else(|e| panic!("the package has no {script}: {e}"));
        let rooted = ["/etc/", "/var/lib/", "/run/systemd/", "/usr/bin/"]
            .iter()
            .fold(text.clone(), |text, path| {
                text.replace(path, &format!("{}{path}", root.display()))
            });
        for path in ["/etc/", "/var/lib/", "/run/systemd/", "/usr/bin/"] {
            assert_eq!(
                rooted.matches(path).count(),
                rooted.matches(&format!("{}{path}", root.display())).count(),
                "{script} names {path} in a way the test cannot point into its root"
            );
        }
        let _ = std::fs::remove_file(&log);
        let output = Command::new("sh")
            .arg("-e")
            .arg("-c")
            .arg(&rooted)
            .arg(script)
            .args(args)
            .env("PATH", format!("{}:/usr/bin:/bin", shims.display()))
            .output()
            .expect("run sh");
        assert!(
            output.status.success(),
            "{script} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    let never_enables_or_starts = |calls: &str, what: &str| {
        for line in calls.lines() {
            assert!(
                !line.contains(" enable ") && !line.contains(" start "),
                "{what}: {line}\n{calls}"
            );
        }
    };

    let install = run("postinst", &["configure"]);
    assert!(
        install.contains("systemctl --system daemon-reload"),
        "install:\n{install}"
    );
    never_enables_or_starts(&install, "install");
    assert!(
        !install.contains("restart"),
        "install restarts nothing:\n{install}"
    );

    // Every unit, and every instance of the template.
    let units = [
        "bzpush-run.service",
        "bzpush-poll.service",
        "bzpush-serve@*.service",
    ];
    let upgrade = run("postinst", &["configure", "0.0.1"]);
    never_enables_or_starts(&upgrade, "upgrade");
    for unit in units {
        assert!(
            upgrade.contains(&format!("try-restart {unit}")),
            "an upgrade restarts {unit} if it runs:\n{upgrade}"
        );
    }
    let before_upgrade = run("prerm", &["upgrade", "0.2.0"]);
    assert!(
        !before_upgrade.contains("stop"),
        "an upgrade stops nothing:\n{before_upgrade}"
    );

    let remove = run("prerm", &["remove"]);
    for unit in units {
        assert!(
            remove.contains(&format!("stop {unit}")),
            "removal stops {unit}:\n{remove}"
        );
    }
    let removed = run("postrm", &["remove"]);
    assert!(removed.contains("daemon-reload"), "removal:\n{removed}");
    assert!(
        root.join("etc/bzpush/bzpush.env").exists() && instance.is_symlink(),
        "removal keeps the configuration"
    );

    run("postrm", &["purge"]);
    for gone in [
        root.join("etc/bzpush"),
        root.join("var/lib/bzpush"),
        root.join("var/lib/private/bzpush"),
        instance,
    ] {
        assert!(
            !gone.exists() && !gone.is_symlink(),
            "purge removes {}",
            gone.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bzpush-deb-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("make a temp folder");
    dir
}

/// Unpacks `deb` into `dir`: its files with `-x`, its control files
/// (maintainer scripts, conffiles) with `-e`.
fn dpkg_deb_unpack(flag: &str, deb: &Path, dir: &Path) {
    let status = Command::new("dpkg-deb")
        .arg(flag)
        .arg(deb)
        .arg(dir)
        .status()
        .expect("run dpkg-deb");
    assert!(status.success(), "dpkg-deb {flag} {}", deb.display());
}
