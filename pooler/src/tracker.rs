//! The response tracker: keeps the server-to-client stream in step with what the client
//! sent, so the pooler knows which responses to pass on, which to swallow (answers to
//! messages it injected), which to synthesise (answers to messages it handled itself),
//! and above all when the server owes nothing more, the only moment a server connection
//! may go back to the pool.
//!
//! # Guarantees
//! The tracker mirrors how PostgreSQL consumes the client's messages, in order,
//! including COPY FROM STDIN, where the server ignores Sync and Flush and fails on
//! anything but CopyData, CopyDone and CopyFail. Where the order in which PostgreSQL
//! consumed the messages cannot be known (an error during a COPY that the client
//! interleaved with Syncs, or a response nothing was sent for) the tracker is
//! *desynchronised*: [`Tracker::is_settled`] is then false until a resynchronisation
//! barrier ([`Tracker::start_resync`]) has come back, so such a connection is never
//! handed to another client with output still pending.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::prepared::Statement;
use crate::protocol::{TxStatus, close_complete, parse_complete};

/// A response the server owes for something sent to it, or one the pooler owes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Parse sent; `name` is the server statement it creates (to forget on error),
    /// `client` the client's name for it (to forget if it fails or is skipped);
    /// `swallow` when the pooler injected it.
    Parse {
        name: Option<Arc<str>>,
        client: Option<Arc<str>>,
        swallow: bool,
    },
    /// Bind or Describe sent; the client's statement when the pooler renamed it (an
    /// error naming the server statement is told in the client's name for it).
    Bind(Option<Arc<Statement>>),
    Describe(Option<Arc<Statement>>),
    Execute,
    /// Close sent; `swallow` when the pooler injected it.
    Close {
        swallow: bool,
    },
    Sync,
    /// Simple query or function call: everything up to ReadyForQuery.
    Query,
    /// A simple query the pooler sent for itself (session parameters): its whole
    /// answer, up to and including ReadyForQuery, is swallowed.
    Injected,
    /// CopyDone or CopyFail sent: ends a COPY FROM STDIN, or is ignored by the server
    /// when none runs. Owes no response of its own.
    CopyEnd,
    /// Answer ParseComplete for a client's Parse (of this name) the pooler did not
    /// send, the statement being on the server already.
    SynthParse(Arc<str>),
    /// Answer CloseComplete for a Close the pooler did not send.
    SynthClose(Arc<str>),
    /// `DEALLOCATE <client name>` sent as `PREPARE t AS SELECT; DEALLOCATE t` (the server
    /// does not know the client's name, but answers as it would, error in a failed
    /// transaction included): the PREPARE's CommandComplete is swallowed, and the
    /// client's name is dropped once the DEALLOCATE's arrives.
    Deallocate {
        client: Arc<str>,
        prepared: bool,
    },
}

impl Pending {
    fn is_synth(&self) -> bool {
        matches!(self, Pending::SynthParse(_) | Pending::SynthClose(_))
    }
}

/// What to do with one server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop,
}

/// A resynchronisation barrier in flight: a query whose one result column is named
/// `marker`; everything before its RowDescription is the client's, the barrier's own
/// messages are swallowed up to and including its ReadyForQuery.
#[derive(Debug)]
struct Resync {
    marker: Vec<u8>,
    seen: bool,
}

/// Tracks the responses owed, in order; see the module docs.
#[derive(Debug)]
pub struct Tracker {
    queue: VecDeque<Pending>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// Status of the last ReadyForQuery from the server.
    pub status: TxStatus,
    /// Server statements found not to exist after an error (to forget).
    pub failed: Vec<Arc<str>>,
    /// Client statements whose Parse failed or was skipped after an error, or that a
    /// `DEALLOCATE` dropped (to forget).
    pub forget_clients: Vec<Arc<str>>,
    /// Client statements whose Close the server skipped after an error (to restore).
    pub skipped_closes: Vec<Arc<str>>,
    /// The server is in COPY FROM STDIN (it sent CopyInResponse, not yet its result).
    server_copy: bool,
    /// The client's messages go into a running COPY: it has not sent CopyDone/CopyFail.
    client_copy: bool,
    /// The running COPY's messages include ones the server treats differently before and
    /// after an error (Sync, or a non-COPY message): an error during it desynchronises.
    copy_ambiguous: bool,
    /// The server is discarding messages until the next Sync (an extended-protocol
    /// message failed and no Sync had been sent after it).
    skipping: bool,
    /// The order of responses is no longer known; see the module docs.
    desync: bool,
    resync: Option<Resync>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            unsynced: false,
            status: TxStatus::Idle,
            failed: Vec::new(),
            forget_clients: Vec::new(),
            skipped_closes: Vec::new(),
            server_copy: false,
            client_copy: false,
            copy_ambiguous: false,
            skipping: false,
            desync: false,
            resync: None,
        }
    }
}

impl Tracker {
    /// Records a message sent (or answered locally), in order.
    pub fn push(&mut self, p: Pending) {
        if self.client_copy {
            match p {
                // Ignored by the server during COPY FROM STDIN, answered after an error.
                Pending::Sync => {
                    self.copy_ambiguous = true;
                    return;
                }
                Pending::CopyEnd => self.client_copy = false,
                // The server fails the COPY on this message and consumes it.
                _ => self.copy_ambiguous = true,
            }
        }
        if self.skipping {
            if p != Pending::Sync {
                // The server discards it; nothing is owed for it.
                self.unsynced = true;
                self.discarded(p);
                return;
            }
            self.skipping = false;
        }
        match p {
            Pending::Sync => self.unsynced = false,
            // Outside a COPY the server ignores it; nothing pending could start one.
            Pending::CopyEnd if self.queue.is_empty() => return,
            Pending::Query | Pending::Injected | Pending::Deallocate { .. } | Pending::CopyEnd => {}
            _ => self.unsynced = true,
        }
        self.queue.push_back(p);
    }

    /// Nothing owed, no open extended-protocol batch, and the order of responses known.
    pub fn is_settled(&self) -> bool {
        self.queue.is_empty() && !self.unsynced && !self.desync && self.resync.is_none()
    }

    /// The order of responses was lost; the connection needs a barrier before reuse.
    #[cfg(test)]
    pub fn is_desynced(&self) -> bool {
        self.desync
    }

    /// Whether everything sent has been answered as far as the model can tell (when
    /// desynchronised, more may still come).
    pub fn answered(&self) -> bool {
        self.resync.is_none()
            && self.queue.is_empty()
            && !self.unsynced
            && !self.server_copy
            && !self.client_copy
    }

    /// Nothing sent is owed an answer any more (extended messages not followed by a Sync
    /// may remain: PostgreSQL answers them only at a Sync or Flush), or the client is in
    /// a COPY FROM STDIN it did not end (the server answers nothing until it does).
    pub fn owes_nothing(&self) -> bool {
        self.resync.is_none() && (self.queue.is_empty() || self.client_copy)
    }

    /// Extended-protocol messages were sent since the last Sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Desynchronised, idle and [`Tracker::answered`]: a barrier may be sent now.
    pub fn ready_for_resync(&self) -> bool {
        self.desync && self.answered() && self.status == TxStatus::Idle
    }

    /// A barrier query whose result column is `marker` was sent: swallow its answer,
    /// pass on everything before it, then count the connection as in step again.
    pub fn start_resync(&mut self, marker: &str) {
        self.resync = Some(Resync {
            marker: marker.as_bytes().to_vec(),
            seen: false,
        });
    }

    /// Whether a barrier is in flight: messages must then be inspected whole, with
    /// [`Tracker::on_resync_message`].
    pub fn resyncing(&self) -> bool {
        self.resync.is_some()
    }

    /// Handles one whole server message (`msg`: tag, length, body) while a barrier is
    /// in flight.
    pub fn on_resync_message(&mut self, msg: &[u8]) -> Verdict {
        let Some(r) = self.resync.as_mut() else {
            return Verdict::Keep;
        };
        let tag = msg.first().copied().unwrap_or(0);
        if !r.seen {
            if tag == b'T'
                && msg
                    .windows(r.marker.len())
                    .any(|w| w == r.marker.as_slice())
            {
                r.seen = true;
                return Verdict::Drop;
            }
            return Verdict::Keep;
        }
        if tag == b'Z' {
            *self = Self {
                status: TxStatus::from_byte(msg.get(5).copied().unwrap_or(b'I')),
                ..Self::default()
            };
        }
        Verdict::Drop
    }

    /// The server statement of a Parse the pooler injected, when it is the next to be
    /// answered.
    pub fn front_injected_parse(&self) -> Option<&Arc<str>> {
        match self.queue.front() {
            Some(Pending::Parse {
                name: Some(n),
                swallow: true,
                ..
            }) => Some(n),
            _ => None,
        }
    }

    /// Whether a Parse of client statement `client` is sent and not yet answered (its
    /// fate, and so the answer to a `DEALLOCATE` of it, is not known yet).
    pub fn client_parse_pending(&self, client: &str) -> bool {
        self.queue.iter().any(|p| match p {
            Pending::Parse {
                client: Some(c), ..
            }
            | Pending::SynthParse(c) => &**c == client,
            _ => false,
        })
    }

    /// Whether the client's own Parse of `client` is sent and unanswered with a sync
    /// point sent after it. A message after that point is not skipped if the Parse
    /// fails, and PostgreSQL then answers it "does not exist" (26000): whether to name
    /// the shared server statement is known only once the Parse is answered. (A Parse
    /// the pooler answers itself cannot fail: it is answered only with nothing before it
    /// unanswered, outside a failed transaction.)
    pub fn client_parse_unsettled_across_sync(&self, client: &str) -> bool {
        let mut sent = false;
        for p in &self.queue {
            match p {
                Pending::Parse {
                    client: Some(c), ..
                } if &**c == client => {
                    sent = true;
                }
                Pending::Sync | Pending::Query | Pending::Injected | Pending::Deallocate { .. }
                    if sent =>
                {
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// The client statement of the Bind or Describe next to be answered, when the
    /// pooler renamed it.
    pub fn front_statement(&self) -> Option<&Arc<Statement>> {
        match self.queue.front() {
            Some(Pending::Bind(Some(n)) | Pending::Describe(Some(n))) => Some(n),
            _ => None,
        }
    }

    /// Whether a Parse of a throwaway copy of client statement `client` (sent when the
    /// transaction's state was not known, see the session) is not answered yet: whether
    /// the client's statement exists, and so what a Bind of it gets, is not known yet.
    pub fn client_probe_pending(&self, client: &str) -> bool {
        self.queue.iter().any(
            |p| matches!(p, Pending::Parse { name: None, client: Some(c), .. } if &**c == client),
        )
    }

    /// Whether a Parse of server statement `name` the pooler injected is unanswered with
    /// a sync point (Sync or a simple query) sent after it. A message after that point
    /// cannot count on the statement: the Parse may fail, or be skipped, in a
    /// transaction that ends before the message runs (a Parse refused in a failed
    /// transaction, then `ROLLBACK`), while the client's statement still exists. (The
    /// client's own Parse failing is different: its statement then does not exist, and
    /// later messages are told so, as PostgreSQL tells them.)
    pub fn parse_unsettled_across_sync(&self, name: &str) -> bool {
        let mut sent = false;
        for p in &self.queue {
            match p {
                Pending::Parse {
                    name: Some(n),
                    swallow: true,
                    ..
                } if &**n == name => sent = true,
                Pending::Sync | Pending::Query | Pending::Injected if sent => return true,
                _ => {}
            }
        }
        false
    }

    /// Server statements whose Parse is sent and not yet answered, oldest first.
    pub fn pending_parses(&self) -> impl Iterator<Item = &Arc<str>> {
        self.queue.iter().filter_map(|p| match p {
            Pending::Parse { name, .. } => name.as_ref(),
            _ => None,
        })
    }

    /// Whether the next server message may be swallowed: the caller must then have it
    /// whole before calling [`Tracker::on_message`].
    pub fn front_swallows(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(
                Pending::Injected
                    | Pending::Parse { swallow: true, .. }
                    | Pending::Close { swallow: true }
                    | Pending::Deallocate {
                        prepared: false,
                        ..
                    }
            )
        )
    }

    /// Whether answers named statements to forget or restore (`failed`,
    /// `forget_clients`, `skipped_closes`).
    pub fn has_outcomes(&self) -> bool {
        !(self.failed.is_empty()
            && self.forget_clients.is_empty()
            && self.skipped_closes.is_empty())
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
                Some(Pending::SynthParse(_)) => out.extend_from_slice(&parse_complete()),
                Some(Pending::SynthClose(_)) => out.extend_from_slice(&close_complete()),
                _ => {}
            }
            self.skip_inert();
        }
        any
    }

    /// Handles the start of one server message (`tag`, ReadyForQuery `status` byte).
    pub fn on_message(&mut self, tag: u8, status: u8) -> Verdict {
        let verdict = self.on_message_inner(tag, status);
        self.skip_inert();
        verdict
    }

    fn on_message_inner(&mut self, tag: u8, status: u8) -> Verdict {
        if self.queue.front() == Some(&Pending::Injected) {
            if tag == b'Z' {
                self.status = TxStatus::from_byte(status);
                self.queue.pop_front();
            }
            return Verdict::Drop;
        }
        // Asynchronous messages may come at any time; anything else answers something.
        if self.queue.is_empty() && !matches!(tag, b'N' | b'S' | b'A' | b'E') {
            self.desync = true;
            return Verdict::Keep;
        }
        if let Some(Pending::Deallocate { client, prepared }) = self.queue.front_mut()
            && tag == b'C'
        {
            if !*prepared {
                *prepared = true;
                return Verdict::Drop;
            }
            self.forget_clients.push(client.clone());
            return Verdict::Keep;
        }
        let front_query = matches!(
            self.queue.front(),
            Some(Pending::Query | Pending::Deallocate { .. })
        );
        match tag {
            b'1' => {
                if let Some(Pending::Parse { swallow: true, .. }) =
                    self.pop_if(|p| matches!(p, Pending::Parse { .. }))
                {
                    return Verdict::Drop;
                }
            }
            b'2' => {
                self.pop_if(|p| matches!(p, Pending::Bind(_)));
            }
            b'3' => {
                if let Some(Pending::Close { swallow: true }) =
                    self.pop_if(|p| matches!(p, Pending::Close { .. }))
                {
                    return Verdict::Drop;
                }
            }
            b'T' | b'n' => {
                self.pop_if(|p| matches!(p, Pending::Describe(_)));
            }
            b'G' | b'W' => self.enter_copy_in(),
            b'C' | b'I' | b's' => {
                if tag == b'C' && self.server_copy {
                    // The COPY ended at its CopyDone.
                    self.server_copy = false;
                    if !self.remove_copy_end() {
                        self.desync = true;
                    }
                }
                self.pop_if(|p| *p == Pending::Execute);
            }
            b'E' => {
                if self.server_copy {
                    // The COPY failed: at CopyFail, on bad data, or on a message that
                    // does not belong in it. Its CopyDone/CopyFail, if sent, is ignored.
                    self.server_copy = false;
                    self.client_copy = false;
                    self.remove_copy_end();
                    if self.copy_ambiguous {
                        self.desync = true;
                    }
                }
                if !front_query && !self.queue.is_empty() {
                    // The server discards everything up to the next Sync, simple queries
                    // included; messages sent later are discarded as they come while no
                    // Sync has been sent.
                    while let Some(p) = self.queue.front() {
                        if *p == Pending::Sync {
                            break;
                        }
                        if let Some(p) = self.queue.pop_front() {
                            self.discarded(p);
                        }
                    }
                    self.skipping = self.queue.is_empty();
                }
            }
            b'Z' => {
                self.server_copy = false;
                self.status = TxStatus::from_byte(status);
                if self
                    .pop_if(|p| {
                        matches!(
                            p,
                            Pending::Sync | Pending::Query | Pending::Deallocate { .. }
                        )
                    })
                    .is_none()
                {
                    self.desync = true;
                }
            }
            _ => {}
        }
        Verdict::Keep
    }

    /// CopyInResponse (or CopyBothResponse) for the message at the front: the messages
    /// sent after it, up to the client's CopyDone/CopyFail, go into the COPY.
    fn enter_copy_in(&mut self) {
        self.server_copy = true;
        self.copy_ambiguous = false;
        let mut i = 1;
        let mut ended = false;
        while i < self.queue.len() {
            match self.queue[i] {
                Pending::CopyEnd => {
                    ended = true;
                    break;
                }
                Pending::Sync => {
                    // Ignored during the COPY (answered if it fails before this point).
                    self.queue.remove(i);
                    self.copy_ambiguous = true;
                }
                _ => {
                    self.copy_ambiguous = true;
                    i += 1;
                }
            }
        }
        self.client_copy = !ended;
        if self.queue.front() == Some(&Pending::Execute) && !self.queue.contains(&Pending::Sync) {
            // The Sync that followed the Execute went into the COPY: another is needed.
            self.unsynced = true;
        }
    }

    /// Removes the first CopyEnd after the front (the running COPY's); whether found.
    fn remove_copy_end(&mut self) -> bool {
        match self
            .queue
            .iter()
            .skip(1)
            .position(|p| *p == Pending::CopyEnd)
        {
            Some(i) => {
                self.queue.remove(i + 1);
                true
            }
            None => false,
        }
    }

    /// CopyDone/CopyFail that reached the front without a COPY running: the server
    /// ignores them.
    fn skip_inert(&mut self) {
        while !self.server_copy && self.queue.front() == Some(&Pending::CopyEnd) {
            self.queue.pop_front();
        }
    }

    /// `p` is discarded by the server (skipping to the next Sync after an error).
    fn discarded(&mut self, p: Pending) {
        match p {
            Pending::Parse { name, client, .. } => {
                self.failed.extend(name);
                self.forget_clients.extend(client);
            }
            Pending::SynthParse(client) => self.forget_clients.push(client),
            Pending::SynthClose(client) => self.skipped_closes.push(client),
            _ => {}
        }
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
        *self = Self::default();
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
