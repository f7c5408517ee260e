//! `mailroom server --config FILE`: a TOML file holding any of the server's flags, and `--print-config`,
//! which shows the effective configuration.
//!
//! The file's keys are the flags' long names (`amqp-listen`, `data-dir`; `snake_case` works too), so every
//! flag, present and future, is a config key without a second list to keep in step. Precedence, highest
//! first: command-line flags, `MAILROOM_*` environment variables, the config file, built-in defaults.
//! The file's values are fed to clap as if typed after the flags that clap saw neither on the command line
//! nor in the environment, so they are parsed and checked exactly as flags are.

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use std::ffi::OsString;
use std::fmt::Write;
use std::path::Path;

/// The `server` flags that are not configuration (what to do, not how to run).
const NOT_CONFIG: &[&str] = &["help", "version", "config", "print-config"];

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {error}")]
    Parse { path: String, error: String },
    /// A key names no flag.
    #[error("config file {path}: unknown key `{key}`{suggestion}")]
    UnknownKey { path: String, key: String, suggestion: String },
    /// A value of a type no flag takes (a table, a date).
    #[error("config file {path}: `{key}` must be a string, number, boolean or array of those")]
    BadValue { path: String, key: String },
}

/// The server subcommand's definition, from the full command.
fn server_command(cli: &Command) -> &Command {
    // `server` is a subcommand of the derive-generated command (a compile-time fact).
    cli.find_subcommand("server").expect("the server subcommand exists")
}

/// Returns `args` with the config file's settings appended to the `server` subcommand's flags, for those
/// flags that `matches` (the first parse of `args`) took from neither the command line nor the environment.
/// `args` is returned unchanged when the subcommand is not `server` or no config file is named.
pub fn apply_config_file(
    cli: &Command,
    matches: &ArgMatches,
    mut args: Vec<OsString>,
) -> Result<Vec<OsString>, ConfigError> {
    let Some(("server", sm)) = matches.subcommand() else { return Ok(args) };
    let Some(path) = sm.get_one::<std::path::PathBuf>("config") else { return Ok(args) };
    args.extend(config_args(server_command(cli), sm, path)?);
    Ok(args)
}

/// The flags that the config file at `path` sets and that `matches` did not get from elsewhere.
fn config_args(server: &Command, matches: &ArgMatches, path: &Path) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: shown.clone(), error })?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigError::Parse { path: shown.clone(), error: e.to_string() })?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = server
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !NOT_CONFIG.contains(&long.as_str()))
            .ok_or_else(|| ConfigError::UnknownKey {
                path: shown.clone(),
                key: key.clone(),
                suggestion: suggest(server, &long).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default(),
            })?;
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let bad = || ConfigError::BadValue { path: shown.clone(), key: key.clone() };
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(|v| scalar(v).ok_or_else(bad)).collect::<Result<_, _>>()?,
            v => vec![scalar(v).ok_or_else(bad)?],
        };
        match arg.get_action() {
            ArgAction::SetTrue => {
                if values.iter().any(|v| v == "true") {
                    out.push(OsString::from(format!("--{long}")));
                }
            }
            _ => out.extend(values.into_iter().map(|v| OsString::from(format!("--{long}={v}")))),
        }
    }
    Ok(out)
}

/// A TOML scalar as the text a flag would be given.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The flag name closest to `key`, if one is close (as clap suggests for mistyped flags).
fn suggest(server: &Command, key: &str) -> Option<String> {
    server
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_CONFIG.contains(l))
        .map(|l| (strsim::jaro(key, l), l))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, l)| l.to_owned())
}

/// The effective configuration as a TOML document that `--config` reads back: every flag with its value
/// and, in a comment, where the value came from. `before` is the parse before the config file's values
/// were appended (it tells the user's flags from the file's), `after` the final one.
pub fn print_config(cli: &Command, before: &ArgMatches, after: &ArgMatches) -> String {
    let server = server_command(cli);
    let (Some(("server", first)), Some(("server", sm))) = (before.subcommand(), after.subcommand()) else {
        return String::new();
    };
    let mut out =
        String::from("# mailroom server: effective configuration (flags > environment > config file > defaults)\n");
    for arg in server.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_CONFIG.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        // Values appended from the config file arrive as command-line flags: the first parse tells them apart.
        let source = match (first.value_source(id), sm.value_source(id)) {
            (Some(ValueSource::CommandLine), _) => "command line".to_owned(),
            (_, Some(ValueSource::CommandLine)) => "config file".to_owned(),
            (_, Some(ValueSource::EnvVariable)) => {
                format!("environment {}", arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default())
            }
            (_, Some(ValueSource::DefaultValue)) => "default".to_owned(),
            _ => "unset".to_owned(),
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let first_line = help.lines().next().unwrap_or("");
        let _ = writeln!(out, "\n# {first_line}");
        match arg.get_action() {
            ArgAction::SetTrue => {
                let on = sm.get_flag(id);
                let _ = writeln!(out, "{long} = {on}  # {source}");
            }
            _ => {
                let raw: Vec<String> = sm
                    .get_raw(id)
                    .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
                    .unwrap_or_default();
                if raw.is_empty() {
                    let _ = writeln!(out, "# {long} =  # unset");
                    continue;
                }
                let multiple = matches!(arg.get_action(), ArgAction::Append);
                let value =
                    if multiple { toml::Value::Array(raw.iter().map(|v| typed(v)).collect()) } else { typed(&raw[0]) };
                let _ = writeln!(out, "{long} = {value}  # {source}");
            }
        }
    }
    out
}

/// A flag's value as the TOML type it reads as: integers and booleans bare, everything else a string.
fn typed(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match v {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(v.to_owned()),
    }
}
