//! Prepared statements in transaction mode, and the response tracker that keeps the
//! server-to-client stream in step with what the client sent.
//!
//! A client's named statement `s1` becomes a pooler-wide server name derived from a
//! hash of its query text and parameter types, so the same name always means the same
//! statement on every server connection. Statements are prepared on demand on whichever
//! connection the client holds ([`crate::pool::PreparedLru`] bounds them per
//! connection); the extra responses of injected messages are swallowed and the responses
//! of messages answered by the pooler itself are synthesised, in order, by [`Tracker`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::protocol::{
    Parse, ReadyForQuery, TxStatus, close_complete, command_complete, parse_complete,
};

/// A client statement mapped to its server statement.
#[derive(Debug)]
pub struct Statement {
    pub server_name: Arc<str>,
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
#[derive(Debug, Default)]
pub struct ClientStatements {
    map: HashMap<String, Arc<Statement>>,
}

impl ClientStatements {
    /// Registers `parse` (a named Parse) and returns its statement.
    pub fn register(&mut self, parse: &Parse) -> Arc<Statement> {
        let server_name = server_name(&parse.query, &parse.param_types);
        let p = Parse {
            name: server_name.to_string(),
            ..parse.clone()
        };
        let st = Arc::new(Statement {
            server_name,
            parse: p.encode(),
        });
        self.map.insert(parse.name.clone(), st.clone());
        st
    }

    pub fn get(&self, name: &str) -> Option<Arc<Statement>> {
        self.map.get(name).cloned()
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.map.remove(name).is_some()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// A simple query the pooler handles itself or must notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecialQuery {
    Deallocate(String),
    DeallocateAll,
    DiscardAll,
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` as the whole query.
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
        _ => None,
    }
}

/// A response the server owes for something sent to it, or one the pooler owes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Parse sent; `name` is the server statement it creates (to forget on error);
    /// `swallow` when the pooler injected it.
    Parse {
        name: Option<Arc<str>>,
        swallow: bool,
    },
    Bind,
    Describe,
    Execute,
    /// Close sent; `swallow` when the pooler injected it.
    Close {
        swallow: bool,
    },
    Sync,
    /// Simple query or function call: everything up to ReadyForQuery.
    Query,
    /// Answer ParseComplete for a Parse the pooler did not send.
    SynthParse,
    /// Answer CloseComplete for a Close the pooler did not send.
    SynthClose,
    /// Answer CommandComplete(tag) + ReadyForQuery for a query handled locally.
    SynthQuery(&'static str),
}

impl Pending {
    fn is_synth(&self) -> bool {
        matches!(
            self,
            Pending::SynthParse | Pending::SynthClose | Pending::SynthQuery(_)
        )
    }
}

/// What to do with one server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop,
}

/// Tracks the responses owed, in order; see the module docs.
#[derive(Debug)]
pub struct Tracker {
    queue: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// Status of the last ReadyForQuery from the server.
    pub status: TxStatus,
    /// Server statements found not to exist after an error (to forget).
    pub failed: Vec<Arc<str>>,
    /// The server is in copy-in mode, where it ignores Sync and Flush.
    copy_in: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            unsynced: false,
            status: TxStatus::Idle,
            failed: Vec::new(),
            copy_in: false,
        }
    }
}

impl Tracker {
    /// Records a message sent (or answered locally), in order.
    pub fn push(&mut self, p: Pending) {
        match p {
            Pending::Sync if self.copy_in => {
                // Ignored by the server during copy-in: no ReadyForQuery for it.
                self.unsynced = false;
                return;
            }
            Pending::Sync => self.unsynced = false,
            Pending::Query | Pending::SynthQuery(_) => {}
            _ => self.unsynced = true,
        }
        self.queue.push_back(p);
    }

    /// Notes that an extended message with no response of its own (Flush, Execute
    /// continuation) was sent.
    pub fn mark_unsynced(&mut self) {
        self.unsynced = true;
    }

    /// The client sent CopyDone or CopyFail: copy-in mode ends.
    pub fn copy_end(&mut self) {
        self.copy_in = false;
    }

    /// Nothing owed and no open extended-protocol batch.
    pub fn is_settled(&self) -> bool {
        self.queue.is_empty() && !self.unsynced
    }

    /// Whether a synthetic response is due now.
    pub fn has_synth(&self) -> bool {
        self.queue.front().is_some_and(Pending::is_synth)
    }

    /// Synthetic responses now due at the front, appended to `out`.
    pub fn take_synth(&mut self, out: &mut Vec<u8>) -> bool {
        let mut any = false;
        while self.queue.front().is_some_and(Pending::is_synth) {
            any = true;
            match self.queue.pop_front() {
                Some(Pending::SynthParse) => out.extend_from_slice(&parse_complete()),
                Some(Pending::SynthClose) => out.extend_from_slice(&close_complete()),
                Some(Pending::SynthQuery(tag)) => {
                    out.extend_from_slice(&command_complete(tag));
                    out.extend_from_slice(&ReadyForQuery(self.status).encode());
                }
                _ => {}
            }
        }
        any
    }

    /// Handles the start of one server message (`tag`, ReadyForQuery `status` byte).
    pub fn on_message(&mut self, tag: u8, status: u8) -> Verdict {
        let front_query = matches!(self.queue.front(), Some(Pending::Query));
        match tag {
            b'1' => {
                if let Some(Pending::Parse { swallow: true, .. }) =
                    self.pop_if(|p| matches!(p, Pending::Parse { .. }))
                {
                    return Verdict::Drop;
                }
            }
            b'2' => {
                self.pop_if(|p| *p == Pending::Bind);
            }
            b'3' => {
                if let Some(Pending::Close { swallow: true }) =
                    self.pop_if(|p| matches!(p, Pending::Close { .. }))
                {
                    return Verdict::Drop;
                }
            }
            b'T' | b'n' => {
                self.pop_if(|p| *p == Pending::Describe);
            }
            b'G' | b'W' => {
                // Copy-in: Syncs the client sent right after Execute are ignored by
                // the server, so no ReadyForQuery will answer them.
                self.copy_in = true;
                while self.queue.len() > 1 && self.queue[1] == Pending::Sync {
                    self.queue.remove(1);
                }
            }
            b'C' | b'I' | b's' => {
                self.pop_if(|p| *p == Pending::Execute);
            }
            b'E' if !front_query => {
                // An error also ends copy-in mode.
                self.copy_in = false;
                // The server skips everything up to the next Sync.
                while let Some(p) = self.queue.front() {
                    if *p == Pending::Sync || *p == Pending::Query {
                        break;
                    }
                    if let Some(Pending::Parse { name: Some(n), .. }) = self.queue.pop_front() {
                        self.failed.push(n);
                    }
                }
            }
            b'Z' => {
                self.copy_in = false;
                self.status = match status {
                    b'T' => TxStatus::InTransaction,
                    b'E' => TxStatus::Failed,
                    _ => TxStatus::Idle,
                };
                self.pop_if(|p| matches!(p, Pending::Sync | Pending::Query));
            }
            _ => {}
        }
        Verdict::Keep
    }

    fn pop_if(&mut self, f: impl Fn(&Pending) -> bool) -> Option<Pending> {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    /// Forgets everything owed (the server connection is gone).
    pub fn reset(&mut self) {
        self.queue.clear();
        self.unsynced = false;
        self.status = TxStatus::Idle;
        self.failed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn swallows_injected_and_synthesises_skipped_in_order() {
        let mut t = Tracker::default();
        // Client: Parse s1 (already on server) + Bind + Execute + Sync.
        t.push(Pending::SynthParse);
        // Pooler injects a Parse for another statement before a Bind.
        t.push(Pending::Parse {
            name: Some("x".into()),
            swallow: true,
        });
        t.push(Pending::Bind);
        t.push(Pending::Execute);
        t.push(Pending::Sync);
        let mut out = Vec::new();
        assert!(t.take_synth(&mut out));
        assert_eq!(out, parse_complete().to_vec());
        assert_eq!(t.on_message(b'1', 0), Verdict::Drop);
        assert_eq!(t.on_message(b'2', 0), Verdict::Keep);
        assert_eq!(t.on_message(b'D', 0), Verdict::Keep);
        assert_eq!(t.on_message(b'C', 0), Verdict::Keep);
        assert!(!t.is_settled());
        assert_eq!(t.on_message(b'Z', b'I'), Verdict::Keep);
        assert!(t.is_settled());
    }

    #[test]
    fn error_skips_to_sync_and_forgets_failed_parse() {
        let mut t = Tracker::default();
        t.push(Pending::Bind);
        t.push(Pending::Parse {
            name: Some("p".into()),
            swallow: false,
        });
        t.push(Pending::SynthClose);
        t.push(Pending::Sync);
        assert_eq!(t.on_message(b'E', 0), Verdict::Keep);
        assert_eq!(t.failed, vec![Arc::<str>::from("p")]);
        let mut out = Vec::new();
        assert!(
            !t.take_synth(&mut out),
            "skipped messages get no synthetic answer"
        );
        t.on_message(b'Z', b'E');
        assert!(t.is_settled());
        assert_eq!(t.status, TxStatus::Failed);
    }

    #[test]
    fn simple_query_holds_until_ready() {
        let mut t = Tracker::default();
        t.push(Pending::Query);
        for tag in [b'T', b'D', b'C', b'E', b'C'] {
            assert_eq!(t.on_message(tag, 0), Verdict::Keep);
            assert!(!t.is_settled());
        }
        t.on_message(b'Z', b'T');
        assert!(t.is_settled());
        assert_eq!(t.status, TxStatus::InTransaction);
    }

    #[test]
    fn extended_copy_in_ignores_syncs_sent_during_copy() {
        let mut t = Tracker::default();
        t.push(Pending::Bind);
        t.push(Pending::Execute);
        t.push(Pending::Sync);
        t.on_message(b'2', 0);
        t.on_message(b'G', 0);
        t.copy_end();
        t.push(Pending::Sync);
        t.on_message(b'C', 0);
        assert!(!t.is_settled());
        t.on_message(b'Z', b'I');
        assert!(t.is_settled(), "one ReadyForQuery settles it");
    }

    #[test]
    fn error_during_extended_copy_ends_copy_mode() {
        let mut t = Tracker::default();
        t.push(Pending::Bind);
        t.push(Pending::Execute);
        t.push(Pending::Sync);
        t.on_message(b'2', 0);
        t.on_message(b'G', 0);
        t.on_message(b'E', 0);
        t.push(Pending::Sync);
        assert!(!t.is_settled(), "the Sync after the error is answered");
        t.on_message(b'Z', b'I');
        assert!(t.is_settled());
        t.push(Pending::Sync);
        assert!(!t.is_settled(), "later Syncs are tracked again");
    }

    #[test]
    fn unsynced_batch_is_not_settled() {
        let mut t = Tracker::default();
        t.push(Pending::Parse {
            name: None,
            swallow: false,
        });
        t.on_message(b'1', 0);
        assert!(!t.is_settled());
        t.push(Pending::Sync);
        t.on_message(b'Z', b'I');
        assert!(t.is_settled());
    }
}
