//! Runs an HTTP request's statements on a server connection of the pool: each as an
//! unnamed extended-protocol query with text parameters (as Neon's proxy does, so one
//! statement per query), a batch inside `BEGIN … COMMIT`, then a reset of the session
//! state a statement may have left, all in one round trip.

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::IsNull;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncReadExt;

use super::sql::{Field, QueryResult, SqlRequest};
use crate::error::{Error, Result};
use crate::memory::Lease;
use crate::pool::ServerConn;
use crate::protocol::TxStatus;

/// What a request may leave on a connection that the next client must not see: open
/// cursors, a changed role, settings, listens, advisory locks, temporary tables and
/// sequence state (`DISCARD ALL` without `DEALLOCATE ALL` and `DISCARD PLANS`, which
/// would drop the statements transaction-mode clients share). A statement `PREPARE`d by
/// name adds `DEALLOCATE ALL`.
const RESET: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
                     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// Memory is leased from `max_client_memory` in steps of this.
const LEASE_STEP: usize = 64 * 1024;
/// What one cell costs beyond its bytes (its `Option<String>`, its JSON).
const CELL_OVERHEAD: usize = 32;

/// How the statements ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every statement's result, in order.
    Done(Vec<QueryResult>),
    /// PostgreSQL's error (its ErrorResponse fields); a batch was rolled back.
    Failed(Vec<(u8, String)>),
}

/// What the statements did to the connection, for the pool's bookkeeping.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// A `DEALLOCATE ALL` or `DISCARD ALL` ran: the connection's shared statements are
    /// gone.
    pub dropped_statements: bool,
    /// DDL ran: shared statements' result types may have changed.
    pub schema_changed: bool,
    /// A statement was prepared by name (`PREPARE`).
    pub prepared: bool,
}

/// The messages for `req`, and how many ReadyForQuery end their answers (the reset's
/// included); the statements' answers come before the `phase`-th of them.
///
/// # Errors
/// Too many parameters for the protocol.
pub fn encode(req: &SqlRequest) -> Result<(BytesMut, usize, usize)> {
    let mut out = BytesMut::new();
    // Strings here hold no NUL (JSON strings may: it ends them, see `put_cstr`).
    let io = |e: std::io::Error| Error::BadRequest(e.to_string());
    let mut syncs = 1;
    let mut phase = 0;
    if let Some(b) = &req.batch {
        frontend::query(&b.begin(), &mut out).map_err(io)?;
        syncs += 1;
        phase = 1;
    }
    for st in &req.statements {
        frontend::parse("", &st.query, [], &mut out).map_err(io)?;
        frontend::bind(
            "",
            "",
            [],
            st.params.iter(),
            |v, buf: &mut BytesMut| match v {
                Some(s) => {
                    buf.put_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            [],
            &mut out,
        )
        .map_err(|_| Error::BadRequest("too many parameters".into()))?;
        frontend::describe(b'P', "", &mut out).map_err(io)?;
        frontend::execute("", 0, &mut out).map_err(io)?;
    }
    frontend::sync(&mut out);
    if req.batch.is_some() {
        // After an error the transaction is aborted and this rolls it back.
        frontend::query("COMMIT", &mut out).map_err(io)?;
        syncs += 1;
    }
    frontend::query(RESET, &mut out).map_err(io)?;
    syncs += 1;
    Ok((out, syncs, phase))
}

/// Sends `req` on `conn` and reads the answers, holding at most `max_bytes` of them
/// (leased from `max_client_memory` as they come).
///
/// # Guarantees
/// On `Ok`, `conn` is idle with the session state of a fresh login (a transaction a
/// statement left open is rolled back); its tracked parameters are the login's.
///
/// # Errors
/// [`Error::HttpTooLarge`] beyond `max_bytes`, [`Error::OutOfMemory`], and server
/// connection failures: the connection must then not be reused.
pub async fn run(
    conn: &mut ServerConn,
    req: &SqlRequest,
    max_bytes: usize,
    lease: &mut Lease<'_>,
) -> Result<(Outcome, Effects)> {
    let (out, mut syncs, phase) = encode(req)?;
    let server = |e: std::io::Error| Error::Server(e.to_string());
    conn.stream.send(&out).await.map_err(server)?;
    let mut results = Vec::new();
    let mut current = QueryResult::default();
    let mut failed: Option<Vec<(u8, String)>> = None;
    let mut effects = Effects::default();
    let mut held = 0usize;
    let mut status = TxStatus::Idle;
    let mut seen = 0;
    let too_large = Error::HttpTooLarge {
        what: "response",
        bound: "max_response_bytes",
        max: max_bytes,
    };
    while syncs > 0 {
        let msg = loop {
            // Every message is bounded, before it is read whole.
            if let Some(len) = pending_len(&conn.buf)
                && held + len > max_bytes
            {
                return Err(too_large);
            }
            if let Some(m) = Message::parse(&mut conn.buf).map_err(server)? {
                break m;
            }
            if conn.stream.read_buf(&mut conn.buf).await.map_err(server)? == 0 {
                // After its own FATAL (a terminated backend, a shutdown) the server's
                // error is the answer, not a lost connection.
                return Err(match failed {
                    Some(f) => Error::ServerError(error_frame(&f)),
                    None => Error::Server("server closed the connection".into()),
                });
            }
        };
        let ours = seen == phase;
        match msg {
            Message::RowDescription(body) if ours => {
                current.fields = body
                    .fields()
                    .map(|f| {
                        Ok(Field {
                            name: f.name().to_string(),
                            table_oid: f.table_oid(),
                            column_id: f.column_id(),
                            type_oid: f.type_oid(),
                            type_size: f.type_size(),
                            type_modifier: f.type_modifier(),
                        })
                    })
                    .collect()
                    .map_err(server)?;
                held += current
                    .fields
                    .iter()
                    .map(|f| f.name.len() + CELL_OVERHEAD)
                    .sum::<usize>();
            }
            Message::DataRow(body) if ours => {
                let buf = body.buffer();
                let row: Vec<Option<String>> = body
                    .ranges()
                    .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                    .collect()
                    .map_err(server)?;
                // Object rows repeat the field names; escaping may grow a value.
                held += buf.len() + row.len() * CELL_OVERHEAD;
                current.rows.push(row);
            }
            Message::CommandComplete(body) => {
                let tag = body.tag().map_err(server)?;
                // The recognisers take the tag as sent, NUL included.
                let t = format!("{tag}\0");
                effects.dropped_statements |= crate::prepared::drops_all_statements(t.as_bytes());
                effects.schema_changed |= crate::prepared::changes_schema(t.as_bytes());
                // `DEALLOCATE ALL` after it drops the shared statements too.
                effects.prepared |= tag == "PREPARE";
                effects.dropped_statements |= tag == "PREPARE";
                if ours {
                    current.tag = tag.into();
                    results.push(std::mem::take(&mut current));
                }
            }
            Message::EmptyQueryResponse if ours => results.push(std::mem::take(&mut current)),
            Message::ErrorResponse(body) => {
                let fields: Vec<(u8, String)> = body
                    .fields()
                    .map(|f| Ok((f.type_(), String::from_utf8_lossy(f.value_bytes()).into())))
                    .collect()
                    .map_err(server)?;
                if seen > phase + usize::from(req.batch.is_some()) {
                    // The reset failed: what the connection holds is not known.
                    return Err(Error::Server("the session reset failed".into()));
                }
                held += fields
                    .iter()
                    .map(|(_, v)| v.len() + CELL_OVERHEAD)
                    .sum::<usize>();
                failed.get_or_insert(fields);
            }
            Message::ParameterStatus(body) => {
                if let (Ok(name), Ok(value)) = (body.name(), body.value()) {
                    conn.session_params.set(name, value);
                }
            }
            Message::ReadyForQuery(body) => {
                status = TxStatus::from_byte(body.status());
                syncs -= 1;
                seen += 1;
            }
            Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                return Err(Error::BadRequest("COPY is not supported over HTTP".into()));
            }
            // ParseComplete, BindComplete, NoData, notices, notifications, and the
            // BEGIN, COMMIT and reset's own answers.
            _ => {}
        }
        if held > lease.held() {
            lease.resize(held.next_multiple_of(LEASE_STEP), "an HTTP response")?;
        }
    }
    if status != TxStatus::Idle {
        // The request left a transaction open: the reset ran inside it and is undone.
        if !conn.run_quiet("ROLLBACK").await? || !conn.run_quiet(RESET).await? {
            return Err(Error::Server("could not end the transaction".into()));
        }
    }
    if effects.prepared && !conn.run_quiet("DEALLOCATE ALL").await? {
        return Err(Error::Server("could not deallocate".into()));
    }
    conn.params_reset();
    Ok((
        match failed {
            Some(f) => Outcome::Failed(f),
            None => Outcome::Done(results),
        },
        effects,
    ))
}

/// An ErrorResponse message with `fields`.
fn error_frame(fields: &[(u8, String)]) -> bytes::Bytes {
    let mut body = BytesMut::new();
    for (t, v) in fields {
        body.put_u8(*t);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(b'E');
    out.put_u32(u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
    out.put_slice(&body);
    out.freeze()
}

/// The length of the message at the front of `buf`, once its header is in.
fn pending_len(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..5)?;
    Some(u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize)
}
