//! Requests as `@neondatabase/serverless` 1.2 sends them, and the JSON it reads.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.as_bytes()).unwrap();
        h.insert(name, HeaderValue::from_str(v).unwrap());
    }
    h
}

const CONN: &str =
    "postgresql://app:p%40ss%2Fw@db.example.com/appdb?sslmode=require&application_name=x";

#[test]
fn a_single_query_with_the_drivers_headers() {
    let h = headers(&[
        ("Neon-Connection-String", CONN),
        ("Neon-Raw-Text-Output", "true"),
        ("Neon-Array-Mode", "true"),
    ]);
    let body = br#"{"query":"select $1, $2","params":["1",null]}"#;
    let r = parse(&h, body).unwrap();
    assert_eq!(
        r.login,
        Login {
            user: "app".into(),
            password: "p@ss/w".into(),
            database: "appdb".into(),
        }
    );
    assert!(r.array_mode && r.batch.is_none());
    assert_eq!(
        r.statements,
        vec![Statement {
            query: "select $1, $2".into(),
            params: vec![Some("1".into()), None],
        }]
    );
}

#[test]
fn a_batch_with_its_transaction_options() {
    let h = headers(&[
        ("Neon-Connection-String", "postgres://app:pw@h/"),
        ("Neon-Batch-Isolation-Level", "RepeatableRead"),
        ("Neon-Batch-Read-Only", "true"),
        ("Neon-Batch-Deferrable", "false"),
    ]);
    let body = br#"{"queries":[{"query":"select 1"},{"query":"select $1","params":[2, true]}]}"#;
    let r = parse(&h, body).unwrap();
    assert_eq!(r.login.database, "app", "no database: the user's name");
    assert!(!r.array_mode);
    assert_eq!(
        r.batch.as_ref().unwrap().begin(),
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY NOT DEFERRABLE"
    );
    assert_eq!(
        r.statements[1].params,
        vec![Some("2".into()), Some("true".into())]
    );
}

#[test]
fn bad_requests_say_what_is_wrong() {
    let conn = [("Neon-Connection-String", "postgresql://app:pw@h/db")];
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [u8], &'a str);
    let cases: [Case; 7] = [
        (
            &[(
                "Neon-Connection-String",
                "postgresql://app:pw@h/app%00user%00postgres",
            )],
            br#"{"query":"select 1"}"#,
            "control character",
        ),
        (
            &[],
            br#"{"query":"select 1"}"#,
            "Neon-Connection-String header is missing",
        ),
        (
            &[("Neon-Connection-String", "mysql://a@b/c")],
            br#"{"query":"select 1"}"#,
            "postgresql:// URL",
        ),
        (
            &[("Neon-Connection-String", "postgresql://h/db")],
            br#"{"query":"select 1"}"#,
            "no user",
        ),
        (&conn, b"{", "request body"),
        (
            &conn,
            br#"{"params":[]}"#,
            "either \"query\" or \"queries\"",
        ),
        (
            &[
                ("Neon-Connection-String", "postgresql://app:pw@h/db"),
                ("Neon-Batch-Isolation-Level", "Chaos"),
            ],
            br#"{"queries":[]}"#,
            "Neon-Batch-Isolation-Level",
        ),
    ];
    for (h, body, want) in cases {
        let e = parse(&headers(h), body).unwrap_err();
        assert!(
            matches!(&e, Error::BadRequest(m) if m.contains(want)),
            "{e} should say {want:?}"
        );
    }
}

fn result() -> QueryResult {
    QueryResult {
        fields: vec![
            Field {
                name: "n".into(),
                table_oid: 0,
                column_id: 0,
                type_oid: 23,
                type_size: 4,
                type_modifier: -1,
            },
            Field {
                name: "t".into(),
                table_oid: 16384,
                column_id: 2,
                type_oid: 25,
                type_size: -1,
                type_modifier: -1,
            },
        ],
        rows: vec![vec![Some("1".into()), None]],
        tag: "SELECT 1".into(),
    }
}

#[test]
fn results_in_array_and_object_mode() {
    let r = result();
    assert_eq!(
        r.to_json(true),
        json!({
            "command": "SELECT", "rowCount": 1, "rowAsArray": true,
            "rows": [["1", null]],
            "fields": [
                {"name": "n", "dataTypeID": 23, "tableID": 0, "columnID": 0,
                 "dataTypeSize": 4, "dataTypeModifier": -1, "format": "text"},
                {"name": "t", "dataTypeID": 25, "tableID": 16384, "columnID": 2,
                 "dataTypeSize": -1, "dataTypeModifier": -1, "format": "text"},
            ],
        })
    );
    assert_eq!(r.to_json(false)["rows"], json!([{"n": "1", "t": null}]));
}

#[test]
fn command_and_row_count_come_from_the_tag() {
    for (tag, command, count) in [
        ("INSERT 0 2", "INSERT", json!(2)),
        ("UPDATE 5", "UPDATE", json!(5)),
        ("CREATE TABLE", "CREATE", json!(null)),
        ("BEGIN", "BEGIN", json!(null)),
        ("", "", json!(null)),
    ] {
        let r = QueryResult {
            tag: tag.into(),
            ..Default::default()
        };
        let j = r.to_json(true);
        assert_eq!(
            (j["command"].clone(), j["rowCount"].clone()),
            (json!(command), count)
        );
    }
}

#[test]
fn errors_carry_every_field_the_driver_reads() {
    let e = error_json(&[
        (b'S', "ERROR".into()),
        (b'C', "42P01".into()),
        (b'M', "relation \"nope\" does not exist".into()),
        (b'P', "15".into()),
        (b'R', "parserOpenTable".into()),
    ]);
    assert_eq!(e["code"], "42P01");
    assert_eq!(e["position"], "15");
    assert_eq!(e["routine"], "parserOpenTable");
    assert_eq!(e["detail"], json!(null));
    let c = client_error_json(&ClientError::fatal("53300", "no server connection"));
    assert_eq!(
        (c["code"].clone(), c["severity"].clone()),
        (json!("53300"), json!("FATAL"))
    );
}
