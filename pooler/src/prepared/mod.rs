//! Prepared statements in transaction mode.
//!
//! A client's named statement `s1` becomes a pooler-wide server name derived from a
//! hash of its query text and parameter types, so the same name always means the same
//! statement on every server connection. Statements are prepared on demand on whichever
//! connection the client holds ([`PreparedLru`] bounds them per connection, and
//! [`Rewriter`] rewrites the client's messages); the extra responses of injected messages are swallowed and the responses
//! of messages answered by the pooler itself are synthesised, in order, by
//! [`crate::tracker::Tracker`].

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::protocol::Parse;

mod lru;
mod rewrite;
pub use lru::PreparedLru;
pub use rewrite::{FLUSH, Rewriter, Step, needs_server};

/// A client statement mapped to its server statement.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    pub server_name: Arc<str>,
    /// The client's name for it.
    pub client_name: Arc<str>,
    /// The Parse message with the server name, for preparing on another connection.
    pub parse: Bytes,
}

/// The server name for a query and its parameter types.
pub fn server_name(query: &str, param_types: &[u8]) -> Arc<str> {
    let mut h = Sha256::new();
    h.update(query.as_bytes());
    h.update([0]);
    h.update(param_types);
    let d = h.finalize();
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("sluice_{hex}").into()
}

/// A client's named statements.
///
/// `DEALLOCATE ALL` and `DISCARD ALL` take effect when the server confirms them (its
/// CommandComplete tag, whatever form the client sent them in), so a failed one keeps
/// the statements as PostgreSQL does. Each statement carries the generation it was
/// registered in, so statements prepared after such a command in the same pipeline
/// survive its confirmation.
#[derive(Debug, Default)]
pub struct ClientStatements {
    map: HashMap<String, (u64, Arc<Statement>)>,
    generation: u64,
    /// Generations cut by recognised deallocations sent and not yet confirmed.
    cuts: std::collections::VecDeque<u64>,
    /// Recently forgotten (server name, client name) pairs: a pipelined message may
    /// still name them, and its error must say the client's name.
    forgotten: std::collections::VecDeque<(Arc<str>, String)>,
    /// Statements a Close removed whose CloseComplete is not answered yet: after an
    /// error the server skips the Close, and the statement is the client's again.
    closing: HashMap<String, (u64, Arc<Statement>)>,
    /// Bytes of the statements in `map` (their Parse messages).
    bytes: usize,
}

/// How many forgotten names [`ClientStatements`] keeps for error messages.
const FORGOTTEN: usize = 16;

impl ClientStatements {
    /// Registers `parse` (a named Parse) and returns its statement, named for schema
    /// epoch `epoch` (see `Shared::schema_epoch`).
    pub fn register(&mut self, parse: &Parse, epoch: u64) -> Arc<Statement> {
        let mut server_name = server_name(&parse.query, &parse.param_types);
        if epoch > 0 {
            server_name = format!("{server_name}_e{epoch}").into();
        }
        let p = Parse {
            name: server_name.to_string(),
            ..parse.clone()
        };
        let st = Arc::new(Statement {
            server_name,
            client_name: parse.name.as_str().into(),
            parse: p.encode(),
        });
        self.bytes += st.parse.len();
        if let Some((_, old)) = self
            .map
            .insert(parse.name.clone(), (self.generation, st.clone()))
        {
            self.bytes -= old.parse.len();
        }
        st
    }

    /// Bytes the client's statements hold (the Parse messages kept to prepare them on
    /// other server connections).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn recount(&mut self) {
        self.bytes = self.map.values().map(|(_, st)| st.parse.len()).sum();
    }

    pub fn get(&self, name: &str) -> Option<Arc<Statement>> {
        self.map.get(name).map(|(_, st)| st.clone())
    }

    /// Removes `name` for a client Close; [`Self::undo_close`] restores it if the Close
    /// turns out skipped.
    pub fn close(&mut self, name: &str) {
        if let Some(entry) = self.map.get(name).cloned() {
            self.closing.insert(name.to_string(), entry);
            self.remove(name);
        }
    }

    /// The server skipped the Close of `name` (an earlier error): it is the client's
    /// again, unless the client prepared another under that name since.
    pub fn undo_close(&mut self, name: &str) {
        if let Some(entry) = self.closing.remove(name)
            && !self.map.contains_key(name)
        {
            self.bytes += entry.1.parse.len();
            self.map.insert(name.to_string(), entry);
        }
    }

    pub fn remove(&mut self, name: &str) -> bool {
        match self.map.remove_entry(name) {
            Some((client, (_, st))) => {
                self.bytes -= st.parse.len();
                self.remember(st.server_name.clone(), client);
                true
            }
            None => false,
        }
    }

    fn remember(&mut self, server: Arc<str>, client: String) {
        if self.forgotten.len() == FORGOTTEN {
            self.forgotten.pop_front();
        }
        self.forgotten.push_back((server, client));
    }

    /// The client's name for server statement `server`, if the client has (or recently
    /// had) one.
    pub fn client_name(&self, server: &str) -> Option<&str> {
        self.map
            .iter()
            .find(|(_, (_, st))| &*st.server_name == server)
            .map(|(c, _)| c.as_str())
            .or_else(|| {
                self.forgotten
                    .iter()
                    .rev()
                    .find(|(s, _)| &**s == server)
                    .map(|(_, c)| c.as_str())
            })
    }

    /// A recognised `DEALLOCATE ALL` / `DISCARD ALL` was sent: statements registered
    /// from now on are not affected by its confirmation.
    pub fn cut(&mut self) {
        self.cuts.push_back(self.generation);
        self.generation += 1;
    }

    /// The server confirmed a `DEALLOCATE ALL` / `DISCARD ALL`: forget the statements
    /// registered before it (before the oldest pending cut, or all of them when the
    /// command came in a form the pooler did not recognise).
    pub fn deallocated_all(&mut self) {
        match self.cuts.pop_front() {
            Some(g) => self.map.retain(|_, (gen_, _)| *gen_ > g),
            None => self.map.clear(),
        }
        self.recount();
    }

    /// Everything sent has been answered: no deallocation or Close is pending.
    pub fn forget_cuts(&mut self) {
        self.cuts.clear();
        // Checked first: clearing a map that once held entries walks its whole table.
        if !self.closing.is_empty() {
            self.closing.clear();
        }
    }
}

/// A simple query the pooler handles itself or must notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecialQuery {
    Deallocate(String),
    DeallocateAll,
    DiscardAll,
    /// `DROP DATABASE [IF EXISTS] name [[WITH] (FORCE)]`: the pooler's idle server
    /// connections to it would make PostgreSQL refuse it.
    DropDatabase(String),
}

/// An ErrorResponse (`msg`: tag, length, body) that names a server statement
/// (`"sluice_…"`) rewritten to name the client's statement instead, as PostgreSQL would
/// have; `None` when it names none the client knows.
pub fn rename_in_error(
    msg: &[u8],
    client_name: impl Fn(&str) -> Option<String>,
) -> Option<Vec<u8>> {
    const OPEN: &[u8] = b"\"sluice_";
    let at = msg.windows(OPEN.len()).position(|w| w == OPEN)?;
    let start = at + 1;
    let end = start + msg[start..].iter().position(|&b| b == b'"')?;
    let server = std::str::from_utf8(&msg[start..end]).ok()?;
    let client = client_name(server)?;
    let mut out = Vec::with_capacity(msg.len() + client.len());
    out.push(msg[0]);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&msg[5..start]);
    out.extend_from_slice(client.as_bytes());
    out.extend_from_slice(&msg[end..]);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Some(out)
}

/// The SQLSTATE of an ErrorResponse (`msg`: tag, length, body).
pub fn sqlstate(msg: &[u8]) -> Option<&[u8]> {
    msg.get(5..)?
        .split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
}

/// The server statement (`sluice_…`) an ErrorResponse says does not exist (`26000`).
pub fn missing_statement(msg: &[u8]) -> Option<&str> {
    if sqlstate(msg) != Some(b"26000") {
        return None;
    }
    const OPEN: &[u8] = b"\"sluice_";
    let start = msg.windows(OPEN.len()).position(|w| w == OPEN)? + 1;
    let end = start + msg[start..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&msg[start..end]).ok()
}

/// Whether the CommandComplete body `tag` (with its NUL) says the server dropped all
/// prepared statements.
pub fn drops_all_statements(tag: &[u8]) -> bool {
    tag == b"DEALLOCATE ALL\0" || tag == b"DISCARD ALL\0"
}

/// Total length (tag byte included) of CommandCompletes that may drop all statements:
/// the hot path looks at a CommandComplete's bytes only when its length is one of them.
pub const DROPS_ALL_LENGTHS: [usize; 2] = [20, 17];

/// Longest CommandComplete (tag byte included) [`changes_schema`] may recognise.
pub const SCHEMA_TAG_MAX: usize = 40;

/// Whether the CommandComplete body `tag` (with its NUL) reports a schema change that
/// may change a prepared statement's result type: any `ALTER …` or `DROP …`, and
/// `CREATE VIEW`/`CREATE RULE` (`CREATE OR REPLACE` reports the same tags). Tables and
/// indexes created do not change existing statements (a table shadowing another through
/// `search_path` is caught by the server's error instead, see the session).
pub fn changes_schema(tag: &[u8]) -> bool {
    [
        b"ALTER ".as_slice(),
        b"DROP ",
        b"CREATE VIEW\0",
        b"CREATE MATERIALIZED VIEW\0",
        b"CREATE RULE\0",
    ]
    .iter()
    .any(|p| tag.starts_with(p))
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL`, `DISCARD ALL` and `DROP DATABASE` as the
/// whole query.
pub fn special_query(sql: &str) -> Option<SpecialQuery> {
    let s = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = s.split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    match l.as_slice() {
        ["discard", "all"] => Some(SpecialQuery::DiscardAll),
        ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
            Some(SpecialQuery::DeallocateAll)
        }
        ["deallocate", _] | ["deallocate", "prepare", _] => {
            let name = words[words.len() - 1];
            let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(q) => q.replace("\"\"", "\""),
                None => name.to_ascii_lowercase(),
            };
            Some(SpecialQuery::Deallocate(name))
        }
        ["drop", "database", ..] => {
            let rest = match l.get(2..4) {
                Some(["if", "exists"]) => &words[4..],
                _ => &words[2..],
            };
            let name = *rest.first()?;
            let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(q) => q.replace("\"\"", "\""),
                None => name.to_ascii_lowercase(),
            };
            Some(SpecialQuery::DropDatabase(name))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_drop_database() {
        for (sql, name) in [
            ("DROP DATABASE app", "app"),
            ("drop database if exists App;", "app"),
            ("DROP DATABASE \"My\"\"Db\" WITH (FORCE)", "My\"Db"),
        ] {
            assert_eq!(
                special_query(sql),
                Some(SpecialQuery::DropDatabase(name.into())),
                "{sql}"
            );
        }
        assert_eq!(special_query("drop database"), None);
        assert_eq!(special_query("drop table app"), None);
    }

    #[test]
    fn server_names_are_stable_and_distinct() {
        assert_eq!(
            server_name("select 1", &[0, 0]),
            server_name("select 1", &[0, 0])
        );
        assert_ne!(
            server_name("select 1", &[0, 0]),
            server_name("select 2", &[0, 0])
        );
        assert_ne!(
            server_name("select $1", &[0, 1, 0, 0, 0, 23]),
            server_name("select $1", &[0, 1, 0, 0, 0, 25])
        );
    }

    #[test]
    fn reads_sqlstates_and_missing_statements() {
        let frame = |body: &[u8]| {
            let mut m = vec![b'E'];
            m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let m = frame(b"SERROR\0C26000\0Mprepared statement \"sluice_ab\" does not exist\0\0");
        assert_eq!(sqlstate(&m), Some(&b"26000"[..]));
        assert_eq!(missing_statement(&m), Some("sluice_ab"));
        let m = frame(b"SERROR\0C25P02\0Mcurrent transaction is aborted\0\0");
        assert_eq!(sqlstate(&m), Some(&b"25P02"[..]));
        assert_eq!(missing_statement(&m), None);
    }

    #[test]
    fn errors_name_the_clients_statement() {
        let body = b"SERROR\0C26000\0Mprepared statement \"sluice_ab12\" does not exist\0\0";
        let mut msg = vec![b'E'];
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(body);
        let out = rename_in_error(&msg, |s| (s == "sluice_ab12").then(|| "s0".to_string()))
            .expect("renamed");
        let want = b"SERROR\0C26000\0Mprepared statement \"s0\" does not exist\0\0";
        assert_eq!(&out[5..], want);
        assert_eq!(
            u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
            want.len() + 4
        );
        assert!(rename_in_error(&msg, |_| None).is_none());
    }

    #[test]
    fn special_queries() {
        assert_eq!(
            special_query(" DISCARD ALL; "),
            Some(SpecialQuery::DiscardAll)
        );
        assert_eq!(
            special_query("deallocate prepare all"),
            Some(SpecialQuery::DeallocateAll)
        );
        assert_eq!(
            special_query("DEALLOCATE S1"),
            Some(SpecialQuery::Deallocate("s1".into()))
        );
        assert_eq!(
            special_query("deallocate \"S1\""),
            Some(SpecialQuery::Deallocate("S1".into()))
        );
        assert_eq!(special_query("select 1; discard all"), None);
    }

    #[test]
    fn schema_changes_are_recognised_by_their_tag() {
        for tag in [
            "ALTER TABLE",
            "DROP TABLE",
            "DROP SCHEMA",
            "CREATE VIEW",
            "CREATE RULE",
        ] {
            let body = format!("{tag}\0");
            assert!(changes_schema(body.as_bytes()), "{tag}");
            assert!(body.len() + 5 <= SCHEMA_TAG_MAX);
        }
        for tag in [
            "CREATE TABLE",
            "CREATE INDEX",
            "DELETE 3",
            "COMMIT",
            "DEALLOCATE",
        ] {
            assert!(!changes_schema(format!("{tag}\0").as_bytes()), "{tag}");
        }
    }
}
