//! The settings table is written once, in `src/config.rs`: the README must
//! agree with it, row for row, and `--help` is generated from it.

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
