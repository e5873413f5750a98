//! Transaction mode's rewrite of the client's Parse, Bind, Describe, Close and
//! `DEALLOCATE`: a pure step from one client message to the bytes queued for the server
//! and the responses recorded with the tracker (owed by the server, swallowed, or
//! answered by the pooler itself). The session does the I/O around it.

use std::sync::Arc;

use bytes::BytesMut;

use super::{ClientStatements, PreparedLru, SpecialQuery, Statement};
use crate::error::Result;
use crate::protocol::{Bind, Close, Describe, Frame, Parse, Query, Target, TxStatus};
use crate::tracker::{Pending, Tracker};

/// A Flush message.
pub const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];

/// What became of a client message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Its rewrite is queued (or it is answered by the pooler).
    Queued,
    /// It must wait until earlier answers decide how to rewrite it: a Flush is queued so
    /// the server sends them; the caller gives the message again once they are in.
    Hold,
}

/// Whether rewriting `f` needs a server connection held (a Close of a client statement
/// does not: only the client's mapping goes).
///
/// # Errors
/// A malformed Close.
pub fn needs_server(f: &Frame) -> Result<bool> {
    if f.tag != b'C' {
        return Ok(true);
    }
    let c = Close::decode(f)?;
    Ok(c.target != Target::Statement || c.name.is_empty())
}

/// One client's view for one message: its statements, the held server connection's
/// statements, the response tracker and the bytes queued for the server.
pub struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    /// `None` only when [`needs_server`] said no.
    pub server: Option<&'a mut PreparedLru>,
    pub tracker: &'a mut Tracker,
    pub out: &'a mut BytesMut,
    /// `max_prepared_statements` per server connection.
    pub cap: usize,
    /// The schema epoch statements registered now are named for.
    pub epoch: u64,
}

impl Rewriter<'_> {
    fn server(&mut self) -> &mut PreparedLru {
        self.server.as_deref_mut().expect("needs_server")
    }

    fn queue(&mut self, bytes: &[u8], p: Pending) {
        self.out.extend_from_slice(bytes);
        self.tracker.push(p);
    }

    /// Whether the client's Parse of `name` may yet fail where this message is not
    /// skipped with it: PostgreSQL then answers the message "does not exist" (the shared
    /// server statement would answer otherwise, or an injected Parse of it be refused in
    /// a failed transaction), decided once the Parse is answered.
    fn fate_unknown(&self, name: &str) -> bool {
        self.tracker.client_probe_pending(name)
            || self.tracker.client_parse_unsettled_across_sync(name)
    }

    fn hold(&mut self) -> Step {
        self.out.extend_from_slice(&FLUSH);
        Step::Hold
    }

    /// Rewrites one Parse, Bind, Describe or Close.
    ///
    /// # Errors
    /// A malformed message.
    pub fn message(&mut self, f: &Frame) -> Result<Step> {
        match f.tag {
            b'P' => self.parse(f),
            b'B' => self.bind(f),
            b'D' => self.describe(f),
            b'C' => self.close(f),
            _ => unreachable!("only extended-protocol statement messages are rewritten"),
        }
    }

    /// A simple query, after `special` (its recognised form, if any) is acted on.
    /// `deallocations` counts the stand-in statements named so far.
    pub fn query(
        &mut self,
        f: &Frame,
        special: Option<&SpecialQuery>,
        deallocations: &mut u64,
    ) -> Step {
        match special {
            // Whether the statement exists depends on a Parse still in flight: answered
            // first, then this is rewritten.
            Some(SpecialQuery::Deallocate(name)) if self.tracker.client_parse_pending(name) => {
                return self.hold();
            }
            // The server does not know the client's name: it runs a statement that
            // answers the same, error in a failed transaction included (see
            // `Pending::Deallocate`).
            Some(SpecialQuery::Deallocate(name)) if self.client.get(name).is_some() => {
                *deallocations += 1;
                let t = format!("sluice_deallocate_{deallocations}");
                let q = Query {
                    sql: format!("PREPARE {t} AS SELECT; DEALLOCATE {t}"),
                };
                let client = name.as_str().into();
                self.queue(
                    &q.encode(),
                    Pending::Deallocate {
                        client,
                        prepared: false,
                    },
                );
                return Step::Queued;
            }
            // Forwarded: the server's CommandComplete confirms it, and its error, if
            // any, is the answer. What is sent after it must not count on the statements
            // it drops: they are prepared again (Close, then Parse).
            Some(SpecialQuery::DeallocateAll | SpecialQuery::DiscardAll) => {
                self.client.cut();
                self.server().clear();
            }
            _ => {}
        }
        self.queue(&f.raw, Pending::Query);
        Step::Queued
    }

    /// Makes sure `st` exists on the server connection, queueing a Parse if not;
    /// `client` is the client's name when the client itself sent the Parse.
    fn prepare(&mut self, st: &Statement, client: Option<Arc<str>>) {
        let swallow = client.is_none();
        if self.server().touch(&st.server_name)
            && !self.tracker.parse_unsettled_across_sync(&st.server_name)
        {
            return;
        }
        let cap = self.cap;
        if let Some(victim) = self.server().insert(st.server_name.clone(), cap) {
            let c = Close {
                target: Target::Statement,
                name: victim.to_string(),
            };
            self.queue(&c.encode(), Pending::Close { swallow: true });
        }
        // Close first (not an error when absent): the list may think a statement gone
        // that a DEALLOCATE ALL still pending, or failing, leaves on the server.
        let close = Close {
            target: Target::Statement,
            name: st.server_name.to_string(),
        };
        self.queue(&close.encode(), Pending::Close { swallow: true });
        let name = Some(st.server_name.clone());
        self.queue(
            &st.parse,
            Pending::Parse {
                name,
                client,
                swallow,
            },
        );
    }

    fn parse(&mut self, f: &Frame) -> Result<Step> {
        // Checked whole, copied only when named (the unnamed statement passes as is).
        let checked = Parse::check(f)?;
        if checked.0.is_empty() {
            let unnamed = Pending::Parse {
                name: None,
                client: None,
                swallow: false,
            };
            self.queue(&f.raw, unnamed);
            return Ok(Step::Queued);
        }
        let p = Parse::from_checked(f, checked);
        // Named for the schema epoch: after a schema change a new Parse gets a fresh
        // server statement, and clients that prepared before keep theirs (and
        // PostgreSQL's answer for it).
        let st = self.client.register(&p, self.epoch);
        if !self.server().touch(&st.server_name) {
            self.prepare(&st, Some(p.name.into()));
        } else if self.tracker.status == TxStatus::Failed || !self.tracker.answered() {
            // The statement is there, but whether the transaction will have failed when
            // this Parse runs is not known (or it has): a Parse of a throwaway copy gets
            // PostgreSQL's own answer (ParseComplete, 25P02, or nothing after an earlier
            // error), then goes.
            let probe = Parse {
                name: format!("{}_probe", st.server_name),
                query: p.query,
                param_types: p.param_types,
            };
            let pending = Pending::Parse {
                name: None,
                client: Some(p.name.into()),
                swallow: false,
            };
            self.queue(&probe.encode(), pending);
            let close = Close {
                target: Target::Statement,
                name: probe.name,
            };
            self.queue(&close.encode(), Pending::Close { swallow: true });
        } else {
            self.tracker.push(Pending::SynthParse(p.name.into()));
        }
        Ok(Step::Queued)
    }

    fn bind(&mut self, f: &Frame) -> Result<Step> {
        let (name, range) = Bind::peek_statement(&f.raw)?;
        if !name.is_empty() && self.fate_unknown(name) {
            return Ok(self.hold());
        }
        let st = (!name.is_empty()).then(|| self.client.get(name)).flatten();
        match st {
            Some(st) => {
                self.prepare(&st, None);
                Bind::write_renamed(&f.raw, range, &st.server_name, self.out);
                self.tracker.push(Pending::Bind(Some(st)));
            }
            None => self.queue(&f.raw, Pending::Bind(None)),
        }
        Ok(Step::Queued)
    }

    fn describe(&mut self, f: &Frame) -> Result<Step> {
        if f.raw.get(5) == Some(&b'P') {
            // Portals are per connection and never renamed.
            self.queue(&f.raw, Pending::Describe(None));
            return Ok(Step::Queued);
        }
        let d = Describe::decode(f)?;
        if d.target == Target::Statement && !d.name.is_empty() && self.fate_unknown(&d.name) {
            return Ok(self.hold());
        }
        let st = (d.target == Target::Statement && !d.name.is_empty())
            .then(|| self.client.get(&d.name))
            .flatten();
        match st {
            Some(st) => {
                self.prepare(&st, None);
                let nd = Describe {
                    target: Target::Statement,
                    name: st.server_name.to_string(),
                };
                self.queue(&nd.encode(), Pending::Describe(Some(st)));
            }
            None => self.queue(&f.raw, Pending::Describe(None)),
        }
        Ok(Step::Queued)
    }

    fn close(&mut self, f: &Frame) -> Result<Step> {
        let c = Close::decode(f)?;
        if c.target == Target::Statement && !c.name.is_empty() {
            // Server statements are shared; only the client's mapping goes (back again
            // if the server skips the Close after an error).
            self.client.close(&c.name);
            self.tracker.push(Pending::SynthClose(c.name.into()));
        } else {
            self.queue(&f.raw, Pending::Close { swallow: false });
        }
        Ok(Step::Queued)
    }
}

#[cfg(test)]
#[path = "rewrite_tests.rs"]
mod tests;
