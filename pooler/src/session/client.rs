//! Client messages: forwarded to the held server connection, transaction mode's
//! prepared-statement rewrite applied ([`crate::prepared::Rewriter`]), and each recorded
//! with the response tracker.

use crate::error::{Error, Result};
use crate::prepared::{Rewriter, SpecialQuery, Step, needs_server, special_query};
use crate::protocol::Frame;
use crate::tracker::Pending;

use super::{CLIENT_BUF, Session};

impl Session<'_> {
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

    async fn forward(&mut self, f: &Frame) -> Result<()> {
        self.ensure_server().await?;
        self.to_server.extend_from_slice(&f.raw);
        Ok(())
    }

    /// Applies transaction mode's rewrite to `f` (a Parse, Bind, Describe, Close, or a
    /// simple query recognised as `special`); a message that must wait is held.
    async fn rewrite(&mut self, f: Frame, special: Option<&SpecialQuery>) -> Result<()> {
        if needs_server(&f)? {
            self.ensure_server().await?;
        }
        let cap = self.cfg.get(self.shared).max_prepared_statements;
        let mut rw = Rewriter {
            client: &mut self.stmts,
            server: self.server.as_mut().map(|sc| &mut sc.prepared),
            tracker: &mut self.tracker,
            out: &mut self.to_server,
            cap,
            epoch: self.shared.schema_epoch(),
        };
        let step = if f.tag == b'Q' {
            rw.query(&f, special, &mut self.deallocations)
        } else {
            rw.message(&f)?
        };
        if f.tag == b'P' {
            self.bound_statements()?;
        }
        if step == Step::Hold {
            self.held = Some(f);
        }
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
                    return self.rewrite(f, special.as_ref()).await;
                }
                self.forward(&f).await?;
                self.tracker.push(Pending::Query);
            }
            b'P' | b'B' | b'D' | b'C' if rewrite => return self.rewrite(f, None).await,
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
