//! The settings table is written once, in `src/config/`: the README must
//! agree with it, row for row, and `--help` is generated from it. And
//! `./test` creates the MariaDB account the harness logs in with.

use bzpush::config::SETTINGS;

#[test]
fn readme_settings_table_matches_the_code() {
    let readme = include_str!("../../README.md");
    let rows: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("| `BZPUSH_"))
        .collect();
    assert_eq!(rows.len(), SETTINGS.len(), "README rows: {rows:#?}");
    for (row, setting) in rows.iter().zip(SETTINGS) {
        let expected = format!(
            "| `{}` | `--{}` | `{}` | {} | {} |",
            setting.env_var(),
            setting.name,
            setting.default,
            setting.range.describe().unwrap_or_default(),
            setting.doc
        );
        assert_eq!(*row, expected, "README row for {}", setting.name);
    }
}

#[test]
fn help_lists_every_setting() {
    let help = bzpush::config::help();
    for setting in SETTINGS {
        assert!(help.contains(&setting.env_var()), "{}", setting.name);
        assert!(
            help.contains(&format!("--{}", setting.name)),
            "{}",
            setting.name
        );
    }
}

/// The harness's account and `./test`'s are one: a test that cannot log
/// in says to run `./test`, which must then create exactly that account.
#[test]
fn the_test_script_creates_the_account_the_harness_logs_in_with() {
    let script = include_str!("../../test");
    for line in [
        format!("TEST_USER={}\n", crate::util::TEST_USER),
        format!("TEST_PASSWORD={}\n", crate::util::TEST_PASSWORD),
    ] {
        assert!(script.contains(&line), "./test sets {line}");
    }
}
