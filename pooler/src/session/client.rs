//! Client messages: forwarded to the held server connection, with transaction mode's
//! prepared-statement rewrite, and each recorded with the response tracker.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::prepared::{SpecialQuery, Statement, special_query};
use crate::protocol::{Bind, Close, Describe, Frame, Parse, Target, TxStatus};
use crate::tracker::Pending;

use super::{CLIENT_BUF, Session};

impl Session<'_> {
    /// Makes sure `st` exists on the held server connection, queueing a Parse if not;
    /// `client` is the client's name when the client itself sent the Parse.
    fn prepare_on_server(&mut self, st: &Statement, client: Option<Arc<str>>) {
        let swallow = client.is_none();
        let sc = self.server.as_mut().expect("server held");
        if sc.prepared.touch(&st.server_name)
            && !self.tracker.parse_unsettled_across_sync(&st.server_name)
        {
            return;
        }
        let cap = self.shared.config().max_prepared_statements;
        if let Some(victim) = sc.prepared.insert(st.server_name.clone(), cap) {
            let c = Close {
                target: Target::Statement,
                name: victim.to_string(),
            };
            self.to_server.extend_from_slice(&c.encode());
            self.tracker.push(Pending::Close { swallow: true });
        }
        // Close first (not an error when absent): the list may think a statement gone
        // that a DEALLOCATE ALL still pending, or failing, leaves on the server.
        let close = Close {
            target: Target::Statement,
            name: st.server_name.to_string(),
        };
        self.to_server.extend_from_slice(&close.encode());
        self.tracker.push(Pending::Close { swallow: true });
        self.to_server.extend_from_slice(&st.parse);
        self.tracker.push(Pending::Parse {
            name: Some(st.server_name.clone()),
            client,
            swallow,
        });
    }

    /// Holds the client's statement map within its bounds: `--max-message-size` for one
    /// client, and its share of `max_client_memory`.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] when either is exceeded.
    fn bound_statements(&mut self) -> Result<()> {
        let bytes = self.stmts.bytes();
        if bytes > self.shared.max_message {
            return Err(Error::OutOfMemory {
                what: "this client's prepared statements",
                bound: "max message size",
                limit: self.shared.max_message,
            });
        }
        if bytes > self.stmt_lease.held() || bytes + CLIENT_BUF < self.stmt_lease.held() {
            self.stmt_lease.resize(bytes, "prepared statements")?;
        }
        Ok(())
    }

    /// Holds `f` until earlier answers decide how to rewrite it; a Flush makes the server
    /// send them (a Parse not followed by a Sync or Flush is otherwise not answered).
    fn hold(&mut self, f: Frame) {
        self.to_server.extend_from_slice(&super::FLUSH);
        self.held = Some(f);
    }

    async fn forward(&mut self, f: &Frame) -> Result<()> {
        self.ensure_server().await?;
        self.to_server.extend_from_slice(&f.raw);
        Ok(())
    }

    pub(super) async fn on_client_message(&mut self, f: Frame) -> Result<()> {
        let rewrite = self.transaction_mode();
        tracing::trace!(tag = %(f.tag as char), "client message");
        match f.tag {
            b'Q' => {
                self.queries.inc();
                let special = if looks_special(&f.raw[5..]) {
                    special_query(&crate::protocol::Query::decode(&f)?.sql)
                } else {
                    None
                };
                if let Some(SpecialQuery::DropDatabase(db)) = &special {
                    // PostgreSQL refuses to drop a database others are connected to:
                    // this process's idle connections to it go first.
                    self.shared.close_idle_to(db);
                }
                if rewrite {
                    match special {
                        // Whether the statement exists depends on a Parse still in
                        // flight: answered first, then this is rewritten.
                        Some(SpecialQuery::Deallocate(name))
                            if self.tracker.client_parse_pending(&name) =>
                        {
                            self.hold(f);
                            return Ok(());
                        }
                        // The server does not know the client's name: it runs a
                        // statement that answers the same, error in a failed
                        // transaction included (see `Pending::Deallocate`).
                        Some(SpecialQuery::Deallocate(name)) if self.stmts.get(&name).is_some() => {
                            self.ensure_server().await?;
                            self.deallocations += 1;
                            let t = format!("sluice_deallocate_{}", self.deallocations);
                            let q = crate::protocol::Query {
                                sql: format!("PREPARE {t} AS SELECT; DEALLOCATE {t}"),
                            };
                            self.to_server.extend_from_slice(&q.encode());
                            self.tracker.push(Pending::Deallocate {
                                client: name.into(),
                                prepared: false,
                            });
                            return Ok(());
                        }
                        // Forwarded: the server's CommandComplete confirms it (see
                        // `on_server_data`), and its error, if any, is the answer.
                        Some(SpecialQuery::DeallocateAll | SpecialQuery::DiscardAll) => {
                            self.stmts.cut();
                            // What is sent after it must not count on the statements
                            // it drops: they are prepared again (Close, then Parse).
                            self.ensure_server().await?.prepared.clear();
                        }
                        _ => {}
                    }
                }
                self.forward(&f).await?;
                self.tracker.push(Pending::Query);
            }
            b'P' if rewrite => {
                let p = Parse::decode(&f)?;
                if p.name.is_empty() {
                    self.forward(&f).await?;
                    self.tracker.push(Pending::Parse {
                        name: None,
                        client: None,
                        swallow: false,
                    });
                    return Ok(());
                }
                // Named for the schema epoch: after a schema change a new Parse gets a
                // fresh server statement, and clients that prepared before keep theirs
                // (and PostgreSQL's answer for it).
                let st = self.stmts.register(&p, self.shared.schema_epoch());
                self.bound_statements()?;
                let sc = self.ensure_server().await?;
                if !sc.prepared.touch(&st.server_name) {
                    self.prepare_on_server(&st, Some(p.name.into()));
                } else if self.tracker.status == TxStatus::Failed || !self.tracker.answered() {
                    // The statement is there, but whether the transaction will have
                    // failed when this Parse runs is not known (or it has): a Parse of a
                    // throwaway copy gets PostgreSQL's own answer (ParseComplete, 25P02,
                    // or nothing after an earlier error), then goes.
                    let probe = Parse {
                        name: format!("{}_probe", st.server_name),
                        query: p.query,
                        param_types: p.param_types,
                    };
                    self.to_server.extend_from_slice(&probe.encode());
                    self.tracker.push(Pending::Parse {
                        name: None,
                        client: Some(p.name.into()),
                        swallow: false,
                    });
                    let close = Close {
                        target: Target::Statement,
                        name: probe.name,
                    };
                    self.to_server.extend_from_slice(&close.encode());
                    self.tracker.push(Pending::Close { swallow: true });
                } else {
                    self.tracker.push(Pending::SynthParse(p.name.into()));
                }
            }
            b'B' if rewrite => {
                let (name, range) = Bind::peek_statement(&f.raw)?;
                if !name.is_empty() && self.tracker.client_probe_pending(name) {
                    // If that Parse fails, PostgreSQL answers this Bind "does not exist"
                    // (the shared statement would answer otherwise): decided once known.
                    self.hold(f);
                    return Ok(());
                }
                let st = (!name.is_empty()).then(|| self.stmts.get(name)).flatten();
                self.ensure_server().await?;
                let client = match st {
                    Some(st) => {
                        self.prepare_on_server(&st, None);
                        Bind::write_renamed(&f.raw, range, &st.server_name, &mut self.to_server);
                        Some(st.clone())
                    }
                    None => {
                        self.to_server.extend_from_slice(&f.raw);
                        None
                    }
                };
                self.tracker.push(Pending::Bind(client));
            }
            b'D' if rewrite && f.raw.get(5) == Some(&b'P') => {
                // Portals are per connection and never renamed.
                self.forward(&f).await?;
                self.tracker.push(Pending::Describe(None));
            }
            b'D' if rewrite => {
                let d = Describe::decode(&f)?;
                let st = (d.target == Target::Statement && !d.name.is_empty())
                    .then(|| self.stmts.get(&d.name))
                    .flatten();
                self.ensure_server().await?;
                let client = match st {
                    Some(st) => {
                        self.prepare_on_server(&st, None);
                        let nd = Describe {
                            target: Target::Statement,
                            name: st.server_name.to_string(),
                        };
                        self.to_server.extend_from_slice(&nd.encode());
                        Some(st.clone())
                    }
                    None => {
                        self.to_server.extend_from_slice(&f.raw);
                        None
                    }
                };
                self.tracker.push(Pending::Describe(client));
            }
            b'C' if rewrite => {
                let c = Close::decode(&f)?;
                if c.target == Target::Statement && !c.name.is_empty() {
                    // Server statements are shared; only the client's mapping goes
                    // (back again if the server skips the Close after an error).
                    self.stmts.close(&c.name);
                    self.tracker.push(Pending::SynthClose(c.name.into()));
                } else {
                    self.forward(&f).await?;
                    self.tracker.push(Pending::Close { swallow: false });
                }
            }
            b'P' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Parse {
                    name: None,
                    client: None,
                    swallow: false,
                });
            }
            b'B' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Bind(None));
            }
            b'D' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Describe(None));
            }
            b'C' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Close { swallow: false });
            }
            b'E' => {
                self.queries.inc();
                self.forward(&f).await?;
                self.tracker.push(Pending::Execute);
            }
            b'S' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Sync);
            }
            b'H' => {
                // Flush owes no answer and opens nothing; without a server connection
                // there is nothing to flush.
                if self.server.is_some() {
                    self.to_server.extend_from_slice(&f.raw);
                }
            }
            b'F' => {
                self.forward(&f).await?;
                self.tracker.push(Pending::Query);
            }
            b'c' | b'f' => {
                // Without a server connection no COPY runs: the server would ignore it.
                if self.server.is_some() {
                    self.to_server.extend_from_slice(&f.raw);
                    self.tracker.push(Pending::CopyEnd);
                }
            }
            b'd' => {
                // COPY data only means something while a server connection is held.
                if self.server.is_some() {
                    self.to_server.extend_from_slice(&f.raw);
                }
            }
            b'p' => return Err(Error::Protocol("unexpected password message".into())),
            other => {
                return Err(Error::Protocol(format!(
                    "unknown message type '{}'",
                    other.escape_ascii()
                )));
            }
        }
        Ok(())
    }
}

/// Cheap pre-check before parsing a Query for DEALLOCATE / DISCARD.
fn looks_special(body: &[u8]) -> bool {
    body.iter()
        .find(|c| !c.is_ascii_whitespace())
        .is_some_and(|c| matches!(c, b'd' | b'D'))
}
