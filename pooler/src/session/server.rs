//! Server responses: forwarded to the client in bulk, with the tracker's verdicts
//! (swallow, synthesise, rename), connection release and resynchronisation.

use bytes::{Buf, Bytes};

use crate::config::PoolMode;
use crate::error::Result;
use crate::params::parse_status_body;
use crate::prepared::{
    DROPS_ALL_LENGTHS, SCHEMA_TAG_MAX, changes_schema, drops_all_statements, missing_statement,
    rename_in_error, sqlstate,
};
use crate::protocol::{Response, TxStatus};
use crate::tracker::Verdict;

use super::{RESET_TIMEOUT, Session, write_client};

impl Session<'_> {
    /// Transaction mode: a connection whose responses fell out of step (see
    /// [`Tracker`]) gets a barrier query once everything known has been answered; its
    /// answer marks the end of what the server owed, and the connection can be reused.
    pub(super) async fn maybe_resync(&mut self) -> Result<()> {
        if !self.transaction_mode() || self.resync_deadline.is_some() {
            return Ok(());
        }
        let Some(sc) = self.server.as_mut() else {
            return Ok(());
        };
        if !self.tracker.ready_for_resync() || !sc.buf.is_empty() {
            return Ok(());
        }
        let marker = format!("sluice_resync_{:016x}", rand::random::<u64>());
        // Which Parses succeeded was lost with the order: drop the statements too, so
        // the connection's statement list is true again.
        let q = crate::protocol::Query {
            sql: format!("SELECT 1 AS \"{marker}\"; DEALLOCATE ALL"),
        };
        tracing::warn!("server connection out of step with its client; resynchronising");
        if let Err(e) = sc.stream.send(&q.encode()).await {
            return Err(self.server_lost(e.to_string()));
        }
        self.tracker.start_resync(&marker);
        self.resync_deadline = Some(tokio::time::Instant::now() + RESET_TIMEOUT);
        Ok(())
    }

    /// Forwards buffered server bytes to the client: in bulk, inspecting only message
    /// headers, dropping responses to injected messages and inserting synthetic ones.
    pub(super) async fn on_server_data(&mut self) -> Result<()> {
        let Some(sc) = self.server.as_deref_mut() else {
            return Ok(());
        };
        let buf = &sc.buf[..];
        let mut pos = 0;
        let mut flushed = 0;
        let mut direct = true;
        self.to_client.clear();
        loop {
            if self.tracker.has_synth() && sc.scanner.at_boundary() {
                // Synthetic answers are due here: splice them in.
                self.to_client.extend_from_slice(&buf[flushed..pos]);
                flushed = pos;
                direct = false;
                self.tracker.take_synth(&mut self.to_client);
            }
            match sc.scanner.next(&buf[pos..]) {
                Response::NeedMore => break,
                Response::Pass(n) => {
                    sc.scanner.consumed(n);
                    pos += n;
                }
                Response::Message { tag, len, status } => {
                    tracing::trace!(tag = %(tag as char), len, "server message");
                    if tag == b'S' || self.tracker.front_swallows() {
                        // Parameter changes are read, swallowed answers dropped whole.
                        if buf.len() - pos < len {
                            break;
                        }
                        if tag == b'S'
                            && let Some((name, value)) = parse_status_body(&buf[pos + 5..pos + len])
                        {
                            sc.session_params.set(name, value);
                            if !self.tracker.front_swallows() {
                                // The client's own SET (or RESET, DISCARD): it follows
                                // the client to its next server connection.
                                self.params.set(name, value);
                            }
                        }
                    }
                    if tag == b'C'
                        && self.mode == PoolMode::Transaction
                        && DROPS_ALL_LENGTHS.contains(&len)
                        && !self.tracker.resyncing()
                    {
                        // Look at the tag: DEALLOCATE ALL / DISCARD ALL, in whatever
                        // form they were sent, dropped the shared statements.
                        if buf.len() - pos < len {
                            break;
                        }
                        if drops_all_statements(&buf[pos + 5..pos + len]) {
                            // Statements whose Parse was sent after it still come.
                            sc.prepared.clear();
                            let cap = self.cfg.get(self.shared).max_prepared_statements;
                            for name in self.tracker.pending_parses() {
                                sc.prepared.insert(name.clone(), cap);
                            }
                            self.stmts.deallocated_all();
                        }
                    }
                    if tag == b'C'
                        && self.mode == PoolMode::Transaction
                        && len <= SCHEMA_TAG_MAX
                        && buf
                            .get(pos + 5)
                            .is_some_and(|b| matches!(b, b'A' | b'C' | b'D'))
                    {
                        // ALTER, DROP, CREATE VIEW… may change what a shared statement
                        // returns: statements prepared before are prepared again.
                        if buf.len() - pos < len {
                            break;
                        }
                        if changes_schema(&buf[pos + 5..pos + len]) {
                            self.shared.schema_changed();
                        }
                    }
                    if tag == b'E'
                        && self.mode == PoolMode::Transaction
                        && !self.tracker.resyncing()
                    {
                        // An error may name a server statement: it must name the
                        // client's. (Errors are the cold path: wait for the whole one.)
                        if buf.len() - pos < len {
                            break;
                        }
                        let msg = &buf[pos..pos + len];
                        if sqlstate(msg) == Some(b"0A000") {
                            // Likely "cached plan must not change result type": a
                            // schema change the pooler did not see (made elsewhere).
                            self.shared.schema_changed();
                        }
                        if let Some(name) = self.tracker.front_injected_parse()
                            && sqlstate(msg) == Some(b"25P02")
                        {
                            // The transaction had failed: the statement cannot be
                            // prepared here. Messages already sent that use it will be
                            // told the same, as PostgreSQL would have told them.
                            self.refused
                                .push((name.clone(), Bytes::copy_from_slice(msg)));
                        }
                        let refused = missing_statement(msg).and_then(|m| {
                            self.refused
                                .iter()
                                .find(|(n, _)| &**n == m)
                                .map(|(_, e)| e.to_vec())
                        });
                        let stmts = &self.stmts;
                        // The name the failing message used, else any the client has.
                        let front = self.tracker.front_statement().cloned();
                        if let Some(renamed) = refused.or_else(|| {
                            rename_in_error(msg, |s| {
                                front
                                    .as_ref()
                                    .filter(|st| &*st.server_name == s)
                                    .map(|st| &*st.client_name)
                                    .or_else(|| stmts.client_name(s))
                                    .map(str::to_string)
                            })
                        }) {
                            self.tracker.on_message(tag, status);
                            self.to_client.extend_from_slice(&buf[flushed..pos]);
                            self.to_client.extend_from_slice(&renamed);
                            pos += len;
                            flushed = pos;
                            direct = false;
                            continue;
                        }
                    }
                    if tag == b'E' {
                        let m = &buf[pos..buf.len().min(pos + len)];
                        self.server_fatal |=
                            m.windows(7).any(|w| w == b"SFATAL\0" || w == b"SPANIC\0");
                    }
                    let verdict = if self.tracker.resyncing() {
                        // The barrier is recognised by content: look at whole messages.
                        if buf.len() - pos < len {
                            break;
                        }
                        let v = self.tracker.on_resync_message(&buf[pos..pos + len]);
                        if !self.tracker.resyncing() {
                            self.resync_deadline = None;
                            sc.prepared.clear();
                        }
                        v
                    } else {
                        self.tracker.on_message(tag, status)
                    };
                    match verdict {
                        Verdict::Keep => sc.scanner.accept(len),
                        Verdict::Drop => {
                            if buf.len() - pos < len {
                                break;
                            }
                            self.to_client.extend_from_slice(&buf[flushed..pos]);
                            pos += len;
                            flushed = pos;
                            direct = false;
                        }
                    }
                }
            }
        }
        if direct {
            write_client(&mut self.client, self.closing, &buf[..pos]).await?;
        } else {
            self.to_client.extend_from_slice(&buf[flushed..pos]);
            write_client(&mut self.client, self.closing, &self.to_client).await?;
            self.to_client.clear();
        }
        sc.buf.advance(pos);
        if sc.buf.capacity() < crate::pool::SERVER_BUF / 2 {
            sc.buf.reserve(crate::pool::SERVER_BUF);
        }
        if self.tracker.has_outcomes() {
            for name in self.tracker.failed.drain(..) {
                sc.prepared.remove(&name);
            }
            for name in self.tracker.forget_clients.drain(..) {
                // PostgreSQL did not create it.
                self.stmts.remove(&name);
            }
            for name in self.tracker.skipped_closes.drain(..) {
                // PostgreSQL did not close it.
                self.stmts.undo_close(&name);
            }
        }
        self.flush_synth().await?;
        self.maybe_release();
        Ok(())
    }

    /// Transaction mode: returns the server connection once everything sent has been
    /// answered and the server is idle. Session mode: only when draining.
    pub(super) fn maybe_release(&mut self) {
        let Some(sc) = self.server.as_ref() else {
            return;
        };
        let idle =
            self.tracker.is_settled() && self.tracker.status == TxStatus::Idle && sc.buf.is_empty();
        if !idle {
            return;
        }
        // Everything sent is answered: no deallocation is still to be confirmed, and no
        // statement refused in a failed transaction is still named.
        self.stmts.forget_cuts();
        self.refused.clear();
        if self.transaction_mode() {
            self.transactions.inc();
            let c = self.detach().expect("held");
            c.release(true, self.cfg.get(self.shared));
        } else if self.draining {
            let c = self.detach().expect("held");
            c.release(false, self.cfg.get(self.shared));
        }
    }
}
