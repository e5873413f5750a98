//! Runs an HTTP request's statements on a server connection of the pool: each as an
//! unnamed extended-protocol query with text parameters (as Neon's proxy does, so one
//! statement per query), a batch inside `BEGIN … COMMIT`, all in one round trip.

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::IsNull;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncReadExt;

use super::sql::{Field, QueryResult, SqlRequest};
use crate::error::{Error, Result};
use crate::pool::ServerConn;
use crate::protocol::TxStatus;

/// How the statements ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every statement's result, in order.
    Done(Vec<QueryResult>),
    /// PostgreSQL's error (its ErrorResponse fields); a batch was rolled back.
    Failed(Vec<(u8, String)>),
}

/// The messages for `req`, and how many ReadyForQuery end their answers.
///
/// # Errors
/// A statement or parameter with a NUL byte, which the protocol cannot carry.
pub fn encode(req: &SqlRequest) -> Result<(BytesMut, usize)> {
    let mut out = BytesMut::new();
    let nul = |_| Error::BadRequest("a statement or parameter holds a NUL byte".into());
    let mut syncs = 1;
    if let Some(b) = &req.batch {
        frontend::query(&b.begin(), &mut out).map_err(nul)?;
        syncs += 1;
    }
    for st in &req.statements {
        frontend::parse("", &st.query, [], &mut out).map_err(nul)?;
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
        frontend::describe(b'P', "", &mut out).map_err(nul)?;
        frontend::execute("", 0, &mut out).map_err(nul)?;
    }
    frontend::sync(&mut out);
    if req.batch.is_some() {
        // After an error the transaction is aborted and this rolls it back.
        frontend::query("COMMIT", &mut out).map_err(nul)?;
        syncs += 1;
    }
    Ok((out, syncs))
}

/// Sends `req` on `conn` and reads the answers, holding at most `max_bytes` of rows.
///
/// # Guarantees
/// On `Ok`, `conn` is idle (a transaction a statement left open is rolled back) and its
/// session parameters are what the server reported.
///
/// # Errors
/// [`Error::HttpTooLarge`] beyond `max_bytes`, and server connection failures: the
/// connection must then be discarded.
pub async fn run(conn: &mut ServerConn, req: &SqlRequest, max_bytes: usize) -> Result<Outcome> {
    let (out, mut syncs) = encode(req)?;
    conn.stream
        .send(&out)
        .await
        .map_err(|e| Error::Server(e.to_string()))?;
    let mut results = Vec::new();
    let mut current = QueryResult::default();
    let mut failed: Option<Vec<(u8, String)>> = None;
    let mut held = 0usize;
    let mut status = TxStatus::Idle;
    // Answers to the batch's BEGIN are not a statement's.
    let mut skip_first = req.batch.is_some();
    while syncs > 0 {
        let msg = loop {
            if let Some(len) = pending_len(&conn.buf)
                && held + len > max_bytes
            {
                return Err(Error::HttpTooLarge {
                    what: "response",
                    bound: "max_response_bytes",
                    max: max_bytes,
                });
            }
            if let Some(m) =
                Message::parse(&mut conn.buf).map_err(|e| Error::Server(e.to_string()))?
            {
                break m;
            }
            let n = conn
                .stream
                .read_buf(&mut conn.buf)
                .await
                .map_err(|e| Error::Server(e.to_string()))?;
            if n == 0 {
                return Err(Error::Server("server closed the connection".into()));
            }
        };
        match msg {
            Message::RowDescription(body) => {
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
                    .map_err(|e| Error::Server(e.to_string()))?;
            }
            Message::DataRow(body) => {
                let buf = body.buffer();
                held += buf.len() + 16;
                let row = body
                    .ranges()
                    .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                    .collect()
                    .map_err(|e| Error::Server(e.to_string()))?;
                current.rows.push(row);
            }
            Message::CommandComplete(body) => {
                current.tag = body.tag().map_err(|e| Error::Server(e.to_string()))?.into();
                if std::mem::take(&mut skip_first) {
                    current = QueryResult::default();
                } else {
                    results.push(std::mem::take(&mut current));
                }
            }
            Message::EmptyQueryResponse => results.push(std::mem::take(&mut current)),
            Message::ErrorResponse(body) => {
                let fields = body
                    .fields()
                    .map(|f| Ok((f.type_(), String::from_utf8_lossy(f.value_bytes()).into())))
                    .collect()
                    .map_err(|e| Error::Server(e.to_string()))?;
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
            }
            Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                return Err(Error::BadRequest("COPY is not supported over HTTP".into()));
            }
            // ParseComplete, BindComplete, NoData, notices, notifications.
            _ => {}
        }
    }
    // The batch's COMMIT answered last.
    results.truncate(req.statements.len());
    if status != TxStatus::Idle && !conn.run_quiet("ROLLBACK").await? {
        return Err(Error::Server("could not end the transaction".into()));
    }
    Ok(match failed {
        Some(f) => Outcome::Failed(f),
        None => Outcome::Done(results),
    })
}

/// The length of the message at the front of `buf`, once its header is in.
fn pending_len(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..5)?;
    (h[0] == b'D').then(|| u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize)
}
