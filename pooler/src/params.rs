//! Session parameters: what a client asked for at startup (directly or in `options`) or
//! later with `SET`, kept per client and applied to whichever server connection it gets,
//! so that in transaction mode one client's `SET client_encoding` never reaches another
//! and every client sees its own values, as PostgreSQL would show them.
//!
//! # Guarantees
//! Only [`TRACKED`] parameters are accepted at startup (others get a clear error unless
//! the config says to ignore them); their values follow the client from connection to
//! connection: before a client's first message on a server connection whose values
//! differ, the pooler sends the `SET`s that make them equal.

use std::collections::HashMap;
use std::hash::BuildHasher;

/// Parameters the pooler carries for clients: those PostgreSQL reports with
/// ParameterStatus (so a `SET` is seen), plus `extra_float_digits` and
/// `client_min_messages`, which drivers send at startup (not reported: a later `SET` of
/// them in transaction mode is the client's to undo, as with PgBouncer).
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "extra_float_digits",
    "client_min_messages",
];

/// Startup packet keys that are not session parameters.
const NOT_PARAMETERS: &[&str] = &["user", "database", "options", "replication"];

/// The canonical (reported) spelling of parameter `name`, if tracked; names are
/// case-insensitive as in PostgreSQL.
pub fn tracked(name: &str) -> Option<&'static str> {
    TRACKED
        .iter()
        .copied()
        .find(|t| t.eq_ignore_ascii_case(name))
}

/// A set of parameter values, with a digest to compare sets cheaply on the hot path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    values: Vec<(&'static str, String)>,
    digest: u64,
}

impl Params {
    /// The tracked ones of `(name, value)` pairs (a server's ParameterStatus list).
    pub fn from_reported<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut p = Self::default();
        for (name, value) in pairs {
            p.set(name, value);
        }
        p
    }

    /// Sets `name` (if tracked) to `value`; whether anything changed.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        let Some(name) = tracked(name) else {
            return false;
        };
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) if v == value => return false,
            Some((_, v)) => *v = value.to_string(),
            None => {
                self.values.push((name, value.to_string()));
                self.values.sort_by_key(|(n, _)| *n);
            }
        }
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        self.digest = KEY
            .get_or_init(std::collections::hash_map::RandomState::new)
            .hash_one(&self.values);
        true
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let name = tracked(name)?;
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `other` holds the same values, by digest: cheap on the hot path. The
    /// digest is keyed with a per-process random key, so client-chosen values cannot be
    /// made to collide.
    pub fn same_as(&self, other: &Params) -> bool {
        self.digest == other.digest && self.values.len() == other.values.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.values.iter().map(|(n, v)| (*n, v.as_str()))
    }

    /// The `SET`s that make a connection with `server`'s values have these; `None` when
    /// nothing differs.
    pub fn sql_to_apply_over(&self, server: &Params) -> Option<String> {
        let mut sql = String::new();
        for (name, value) in self.iter() {
            if server.get(name) != Some(value) {
                sql.push_str(&format!("SET {name} TO '{}';", value.replace('\'', "''")));
            }
        }
        // A parameter another client set that this one never asked for (those PostgreSQL
        // does not report, which a client's values then lack): back to the default.
        for (name, _) in server.iter() {
            if self.get(name).is_none() {
                sql.push_str(&format!("RESET {name};"));
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

/// `value` of parameter `name` as PostgreSQL reports it, for the aliases drivers send
/// (`client_encoding` `utf-8`, `unicode`: `UTF8`); other values as given.
pub fn canonical(name: &str, value: &str) -> String {
    if name == "client_encoding" {
        // As PostgreSQL reads encoding names: only letters and digits count, in any case
        // (asyncpg sends `'utf-8'`, quotes included).
        let clean: String = value
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        return match clean.as_str() {
            "utf8" | "unicode" => "UTF8".into(),
            "sqlascii" => "SQL_ASCII".into(),
            "latin1" | "iso88591" => "LATIN1".into(),
            "latin9" | "iso885915" => "LATIN9".into(),
            "win1252" | "windows1252" => "WIN1252".into(),
            "eucjp" => "EUC_JP".into(),
            "sjis" | "shiftjis" => "SJIS".into(),
            _ => value.trim_matches('\'').to_ascii_uppercase(),
        };
    }
    value.to_string()
}

/// Name and value of a ParameterStatus body (`name\0value\0`).
pub fn parse_status_body(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

/// Why a startup packet's parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

/// The session parameters a client asked for at startup: its tracked keys, and the
/// `-c name=value` / `--name=value` switches of `options`. `ignore` names parameters to
/// drop silently (PgBouncer's `ignore_startup_parameters`).
///
/// # Errors
/// [`Unsupported`] names the first parameter the pooler cannot carry.
pub fn from_startup(
    startup: &HashMap<String, String>,
    ignore: &[String],
) -> Result<Vec<(&'static str, String)>, Unsupported> {
    let ignored = |n: &str| ignore.iter().any(|i| i.eq_ignore_ascii_case(n));
    let mut out = Vec::new();
    let mut take = |name: &str, value: &str| -> Result<(), Unsupported> {
        match tracked(name) {
            Some(t) => {
                out.push((t, value.to_string()));
                Ok(())
            }
            None if ignored(name) => Ok(()),
            None => Err(Unsupported(name.to_string())),
        }
    };
    let mut keys: Vec<&String> = startup.keys().collect();
    keys.sort();
    for k in keys {
        if !NOT_PARAMETERS.contains(&k.as_str()) {
            take(k, &startup[k])?;
        }
    }
    if let Some(options) = startup.get("options") {
        for (name, value) in option_switches(options)? {
            take(&name, &value)?;
        }
    }
    Ok(out)
}

/// `-c name=value` and `--name=value` switches of an `options` string (backslash escapes
/// a space, as libpq documents).
fn option_switches(options: &str) -> Result<Vec<(String, String)>, Unsupported> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| Unsupported("options (-c without a setting)".into()))?
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else {
            return Err(Unsupported(format!("options ({w})")));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| Unsupported(format!("options ({setting})")))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_parameters_and_options() {
        let got = from_startup(
            &startup(&[
                ("user", "app"),
                ("database", "app"),
                ("application_name", "psql"),
                ("client_encoding", "LATIN1"),
                ("options", "-c datestyle=SQL,DMY --timezone=UTC -c"),
            ]),
            &[],
        );
        assert_eq!(
            got,
            Err(Unsupported("options (-c without a setting)".into()))
        );
        let got = from_startup(
            &startup(&[
                ("user", "app"),
                ("application_name", "psql"),
                ("options", "-c datestyle=SQL,\\ DMY --TimeZone=UTC"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("application_name", "psql".to_string()),
                ("DateStyle", "SQL, DMY".to_string()),
                ("TimeZone", "UTC".to_string()),
            ]
        );
    }

    #[test]
    fn untracked_parameters_are_refused_unless_ignored() {
        let s = startup(&[("user", "app"), ("search_path", "x"), ("geqo", "off")]);
        assert_eq!(from_startup(&s, &[]), Err(Unsupported("geqo".into())));
        let ignore = vec!["GEQO".to_string(), "search_path".to_string()];
        assert_eq!(from_startup(&s, &ignore), Ok(vec![]));
        let s = startup(&[("options", "-c statement_timeout=5")]);
        assert_eq!(
            from_startup(&s, &[]),
            Err(Unsupported("statement_timeout".into()))
        );
    }

    #[test]
    fn reads_parameter_status_bodies() {
        assert_eq!(
            parse_status_body(b"TimeZone\0UTC\0"),
            Some(("TimeZone", "UTC"))
        );
        assert_eq!(parse_status_body(b"TimeZone"), None);
        assert_eq!(canonical("client_encoding", "utf-8"), "UTF8");
        assert_eq!(canonical("client_encoding", "'utf-8'"), "UTF8");
        assert_eq!(canonical("client_encoding", "sql_ascii"), "SQL_ASCII");
        assert_eq!(canonical("application_name", "utf-8"), "utf-8");
    }

    #[test]
    fn a_parameter_one_client_set_is_reset_for_the_next() {
        let login = Params::from_reported([("client_encoding", "UTF8")]);
        let mut a = login.clone();
        a.set("client_min_messages", "warning");
        a.set("extra_float_digits", "0");
        assert_eq!(
            a.sql_to_apply_over(&login).as_deref(),
            Some("SET client_min_messages TO 'warning';SET extra_float_digits TO '0';")
        );
        // The connection now has a's values; b asked for neither.
        let b = login.clone();
        assert_eq!(
            b.sql_to_apply_over(&a).as_deref(),
            Some("RESET client_min_messages;RESET extra_float_digits;")
        );
        assert_eq!(login.sql_to_apply_over(&login), None);
    }

    #[test]
    fn sets_only_what_differs_and_quotes_values() {
        let server = Params::from_reported([
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("server_version", "15.8"),
        ]);
        assert_eq!(server.get("server_version"), None, "not tracked");
        let mut client = server.clone();
        assert!(client.same_as(&server));
        assert_eq!(client.sql_to_apply_over(&server), None);
        assert!(client.set("application_name", "it's"));
        assert!(client.set("datestyle", "SQL, DMY"));
        assert!(!client.set("DateStyle", "SQL, DMY"), "unchanged");
        assert!(!client.same_as(&server));
        assert_eq!(
            client.sql_to_apply_over(&server).unwrap(),
            "SET DateStyle TO 'SQL, DMY';SET application_name TO 'it''s';"
        );
    }
}
