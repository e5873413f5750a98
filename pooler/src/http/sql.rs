//! `POST /sql` as `@neondatabase/serverless` speaks it, pure: the request (headers and
//! JSON body) to statements, PostgreSQL's answers to the JSON result or error.
//!
//! Values are PostgreSQL's text output, as strings (or `null`), with each field's type
//! OID, which the driver parses (`Neon-Raw-Text-Output: true`, what the driver sends;
//! the pooler never converts values itself).

use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ClientError, Error};

/// Who the request logs in as, from its `Neon-Connection-String`.
#[derive(Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub database: String,
}

/// One statement and its parameters (text, or NULL).
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    pub query: String,
    pub params: Vec<Option<String>>,
}

/// How a batch's transaction starts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOptions {
    pub isolation: Option<&'static str>,
    pub read_only: Option<bool>,
    pub deferrable: Option<bool>,
}

impl BatchOptions {
    /// The `BEGIN` that opens the batch's transaction.
    pub fn begin(&self) -> String {
        let mut sql = String::from("BEGIN");
        if let Some(i) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(i);
        }
        match self.read_only {
            Some(true) => sql.push_str(" READ ONLY"),
            Some(false) => sql.push_str(" READ WRITE"),
            None => {}
        }
        match self.deferrable {
            Some(true) => sql.push_str(" DEFERRABLE"),
            Some(false) => sql.push_str(" NOT DEFERRABLE"),
            None => {}
        }
        sql
    }
}

/// A whole request.
#[derive(Debug, PartialEq, Eq)]
pub struct SqlRequest {
    pub login: Login,
    /// Rows as arrays (else as objects keyed by field name).
    pub array_mode: bool,
    /// `Some` for a batch (`{"queries": [...]}`), run in one transaction.
    pub batch: Option<BatchOptions>,
    pub statements: Vec<Statement>,
}

#[derive(Deserialize)]
struct Body {
    query: Option<String>,
    #[serde(default)]
    params: Vec<Value>,
    queries: Option<Vec<QueryBody>>,
}

#[derive(Deserialize)]
struct QueryBody {
    query: String,
    #[serde(default)]
    params: Vec<Value>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Error> {
    h.get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| bad(format!("header {name} is not text")))
        })
        .transpose()
}

fn flag(h: &HeaderMap, name: &str) -> Result<Option<bool>, Error> {
    match header(h, name)? {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(bad(format!("header {name}: {v:?} is not true or false"))),
    }
}

/// The parameter as PostgreSQL's text input (the driver sends strings or null; other
/// JSON values are taken as their JSON text).
fn param(v: Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// The user, password and database of a `postgres://` or `postgresql://` URL (the host
/// is the client's business: this pooler serves its own pools).
///
/// # Errors
/// [`Error::BadRequest`] for anything else, or without a user.
pub fn login(conn: &str) -> Result<Login, Error> {
    let url = url::Url::parse(conn).map_err(|e| bad(format!("Neon-Connection-String: {e}")))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(bad("Neon-Connection-String must be a postgresql:// URL"));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    if user.is_empty() {
        return Err(bad("Neon-Connection-String has no user"));
    }
    let password = url.password().map(decode).unwrap_or_default();
    let database = match decode(url.path().trim_start_matches('/')) {
        d if d.is_empty() => user.clone(),
        d => d,
    };
    // A startup packet cannot carry them: a NUL would end the name and start another
    // parameter in the server's startup packet.
    for (what, v) in [
        ("user", &user),
        ("password", &password),
        ("database", &database),
    ] {
        if v.chars().any(char::is_control) {
            return Err(bad(format!(
                "Neon-Connection-String: the {what} holds a control character"
            )));
        }
    }
    Ok(Login {
        user,
        password,
        database,
    })
}

/// What the headers say: who logs in, and how.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub login: Login,
    pub array_mode: bool,
    /// For a batch.
    pub batch: BatchOptions,
}

/// Parses the headers (checked, and the login verified, before the body is read).
///
/// # Errors
/// [`Error::BadRequest`] naming what is wrong.
pub fn parse_head(headers: &HeaderMap) -> Result<Head, Error> {
    let conn = header(headers, "neon-connection-string")?
        .ok_or_else(|| bad("the Neon-Connection-String header is missing"))?;
    let isolation = match header(headers, "neon-batch-isolation-level")? {
        None => None,
        Some("ReadUncommitted") => Some("READ UNCOMMITTED"),
        Some("ReadCommitted") => Some("READ COMMITTED"),
        Some("RepeatableRead") => Some("REPEATABLE READ"),
        Some("Serializable") => Some("SERIALIZABLE"),
        Some(other) => {
            return Err(bad(format!("unknown Neon-Batch-Isolation-Level {other:?}")));
        }
    };
    Ok(Head {
        login: login(conn)?,
        array_mode: flag(headers, "neon-array-mode")?.unwrap_or(false),
        batch: BatchOptions {
            isolation,
            read_only: flag(headers, "neon-batch-read-only")?,
            deferrable: flag(headers, "neon-batch-deferrable")?,
        },
    })
}

/// Parses the body of a request with `head`.
///
/// # Errors
/// [`Error::BadRequest`] naming what is wrong.
pub fn parse_body(head: Head, body: &[u8]) -> Result<SqlRequest, Error> {
    let body: Body = serde_json::from_slice(body).map_err(|e| bad(format!("request body: {e}")))?;
    let params = |p: Vec<Value>| p.into_iter().map(param).collect();
    let (batch, statements) = match (body.query, body.queries) {
        (Some(query), None) => (
            None,
            vec![Statement {
                query,
                params: params(body.params),
            }],
        ),
        (None, Some(queries)) => {
            let statements = queries
                .into_iter()
                .map(|q| Statement {
                    query: q.query,
                    params: params(q.params),
                })
                .collect();
            (Some(head.batch), statements)
        }
        _ => return Err(bad("the body needs either \"query\" or \"queries\"")),
    };
    Ok(SqlRequest {
        login: head.login,
        array_mode: head.array_mode,
        batch,
        statements,
    })
}

/// Parses a whole request.
///
/// # Errors
/// [`Error::BadRequest`] naming what is wrong.
#[cfg(test)]
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<SqlRequest, Error> {
    parse_body(parse_head(headers)?, body)
}

/// One column of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub column_id: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
}

/// What one statement returned.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueryResult {
    pub fields: Vec<Field>,
    pub rows: Vec<Vec<Option<String>>>,
    /// The CommandComplete tag (empty for an empty query).
    pub tag: String,
}

impl QueryResult {
    /// The JSON the driver reads: `command` is the tag's first word, `rowCount` its
    /// last number (none for tags without one, such as `CREATE TABLE`).
    pub fn to_json(&self, array_mode: bool) -> Value {
        let command = self.tag.split(' ').next().unwrap_or_default();
        let row_count = self
            .tag
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|_| self.tag.contains(' '));
        let fields: Vec<Value> = self
            .fields
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "dataTypeID": f.type_oid,
                    "tableID": f.table_oid,
                    "columnID": f.column_id,
                    "dataTypeSize": f.type_size,
                    "dataTypeModifier": f.type_modifier,
                    "format": "text",
                })
            })
            .collect();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                if array_mode {
                    Value::Array(r.iter().map(|v| json!(v)).collect())
                } else {
                    let mut m = Map::new();
                    for (f, v) in self.fields.iter().zip(r) {
                        m.insert(f.name.clone(), json!(v));
                    }
                    Value::Object(m)
                }
            })
            .collect();
        json!({
            "command": command,
            "rowCount": row_count,
            "rows": rows,
            "fields": fields,
            "rowAsArray": array_mode,
        })
    }
}

/// The error body of PostgreSQL's ErrorResponse fields (type byte, value), with the keys
/// the driver copies onto its error (`code` is the SQLSTATE; absent fields are null).
pub fn error_json(fields: &[(u8, String)]) -> Value {
    let get = |t: u8| fields.iter().find(|(k, _)| *k == t).map(|(_, v)| v.clone());
    json!({
        "message": get(b'M').unwrap_or_default(),
        "severity": get(b'S'),
        "code": get(b'C'),
        "detail": get(b'D'),
        "hint": get(b'H'),
        "position": get(b'P'),
        "internalPosition": get(b'p'),
        "internalQuery": get(b'q'),
        "where": get(b'W'),
        "schema": get(b's'),
        "table": get(b't'),
        "column": get(b'c'),
        "dataType": get(b'd'),
        "constraint": get(b'n'),
        "file": get(b'F'),
        "line": get(b'L'),
        "routine": get(b'R'),
    })
}

/// The error body of one of the pooler's own errors.
pub fn client_error_json(e: &ClientError) -> Value {
    error_json(&[
        (b'S', e.severity.to_string()),
        (b'C', e.code.to_string()),
        (b'M', e.message.clone()),
    ])
}

#[cfg(test)]
#[path = "sql_tests.rs"]
mod tests;
