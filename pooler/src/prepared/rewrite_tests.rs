//! The rewrite on byte buffers: client messages in, the bytes queued for the server and
//! the responses the tracker is told to expect out.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::prepared::{server_name, special_query};
use crate::protocol::{Frame, Query, Target, split_frame};
use crate::tracker::Verdict;

const SQL: &str = "select $1::int";

fn frame(bytes: Bytes) -> Frame {
    let mut b = BytesMut::from(&bytes[..]);
    split_frame(&mut b, 1 << 20).unwrap().unwrap()
}

fn parse(name: &str, sql: &str) -> Frame {
    frame(
        Parse {
            name: name.into(),
            query: sql.into(),
            param_types: Bytes::from_static(&[0, 0]),
        }
        .encode(),
    )
}

fn bind(statement: &str) -> Frame {
    frame(
        Bind {
            portal: String::new(),
            statement: statement.into(),
            rest: Bytes::from_static(&[0, 0, 0, 0, 0, 0]),
        }
        .encode(),
    )
}

fn close(target: Target, name: &str) -> Frame {
    frame(
        Close {
            target,
            name: name.into(),
        }
        .encode(),
    )
}

fn query(sql: &str) -> Frame {
    frame(Query { sql: sql.into() }.encode())
}

/// The messages in `out`, as (tag, statement or query name) pairs.
fn messages(out: &[u8]) -> Vec<(char, String)> {
    let mut b = BytesMut::from(out);
    let mut v = Vec::new();
    while let Some(f) = split_frame(&mut b, 1 << 20).unwrap() {
        let name = match f.tag {
            b'P' => Parse::decode(&f).unwrap().name,
            b'B' => Bind::decode(&f).unwrap().statement,
            b'C' => Close::decode(&f).unwrap().name,
            b'D' => Describe::decode(&f).unwrap().name,
            b'Q' => Query::decode(&f).unwrap().sql,
            _ => String::new(),
        };
        v.push((f.tag as char, name));
    }
    v
}

/// One client and one server connection.
#[derive(Default)]
struct World {
    client: ClientStatements,
    server: PreparedLru,
    tracker: Tracker,
    out: BytesMut,
    deallocations: u64,
}

impl World {
    fn send(&mut self, f: &Frame, cap: usize) -> Step {
        let server = needs_server(f).unwrap().then_some(&mut self.server);
        let mut rw = Rewriter {
            client: &mut self.client,
            server,
            tracker: &mut self.tracker,
            out: &mut self.out,
            cap,
            epoch: 0,
        };
        if f.tag == b'Q' {
            let special = special_query(&Query::decode(f).unwrap().sql);
            rw.query(f, special.as_ref(), &mut self.deallocations)
        } else {
            rw.message(f).unwrap()
        }
    }

    fn sent(&mut self) -> Vec<(char, String)> {
        let v = messages(&self.out);
        self.out.clear();
        v
    }

    /// The client sends a Sync, and the server answers everything without error.
    fn answer_all(&mut self, replies: &[u8]) {
        self.tracker.push(crate::tracker::Pending::Sync);
        for &tag in replies.iter().chain(b"Z") {
            let status = if tag == b'Z' { b'I' } else { 0 };
            self.tracker.on_message(tag, status);
        }
        assert!(self.tracker.is_settled());
    }
}

#[test]
fn a_named_parse_is_prepared_under_the_server_name_closing_any_stale_copy_first() {
    let mut w = World::default();
    assert_eq!(w.send(&parse("s1", SQL), 100), Step::Queued);
    let name = server_name(SQL, &[0, 0]).to_string();
    assert_eq!(w.sent(), vec![('C', name.clone()), ('P', name.clone())]);
    // Both answers are the pooler's: the Close's is swallowed, the Parse's is the
    // client's own ParseComplete.
    assert!(w.tracker.front_swallows());
    assert_eq!(w.tracker.on_message(b'3', 0), Verdict::Drop);
    assert_eq!(w.tracker.on_message(b'1', 0), Verdict::Keep);
    assert!(w.client.get("s1").is_some());
}

#[test]
fn a_statement_already_on_the_connection_is_answered_by_the_pooler() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    w.sent();
    w.answer_all(b"31");
    // Another client (same text) on the same connection, idle and answered.
    w.client = ClientStatements::default();
    w.send(&parse("other", SQL), 100);
    assert!(w.sent().is_empty(), "nothing reaches the server");
    let mut synth = Vec::new();
    assert!(w.tracker.take_synth(&mut synth));
    assert_eq!(synth, b"1\0\0\0\x04");
}

#[test]
fn bind_names_the_server_statement_and_prepares_it_where_missing() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    w.sent();
    w.answer_all(b"31");
    let name = server_name(SQL, &[0, 0]).to_string();
    w.send(&bind("s1"), 100);
    assert_eq!(w.sent(), vec![('B', name.clone())]);
    // On another server connection the statement is prepared first, its answers
    // swallowed.
    w.server = PreparedLru::default();
    w.send(&bind("s1"), 100);
    assert_eq!(
        w.sent(),
        vec![('C', name.clone()), ('P', name.clone()), ('B', name)]
    );
    // An unknown or unnamed statement goes as it is, for PostgreSQL to answer.
    w.send(&bind("nope"), 100);
    assert_eq!(w.sent(), vec![('B', "nope".into())]);
}

#[test]
fn the_least_recently_used_statement_is_closed_beyond_the_cap() {
    let mut w = World::default();
    w.send(&parse("a", "select 1"), 1);
    w.send(&parse("b", "select 2"), 1);
    let (a, b) = (
        server_name("select 1", &[0, 0]).to_string(),
        server_name("select 2", &[0, 0]).to_string(),
    );
    assert_eq!(
        w.sent(),
        vec![
            ('C', a.clone()),
            ('P', a.clone()),
            ('C', a),
            ('C', b.clone()),
            ('P', b)
        ]
    );
    assert_eq!(w.server.len(), 1);
}

#[test]
fn closing_a_client_statement_keeps_the_shared_one() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    w.sent();
    w.answer_all(b"31");
    let c = close(Target::Statement, "s1");
    assert!(!needs_server(&c).unwrap());
    w.send(&c, 100);
    assert!(w.sent().is_empty());
    assert_eq!(w.server.len(), 1);
    // Portals are the connection's: closed there.
    let p = close(Target::Portal, "p");
    assert!(needs_server(&p).unwrap());
    w.send(&p, 100);
    assert_eq!(w.sent(), vec![('C', "p".into())]);
}

#[test]
fn deallocate_runs_a_stand_in_and_waits_for_a_parse_in_flight() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    w.sent();
    // Its Parse is not answered: whether s1 exists is not known yet.
    let d = query("DEALLOCATE s1");
    assert_eq!(w.send(&d, 100), Step::Hold);
    assert_eq!(w.sent(), vec![('H', String::new())]);
    w.answer_all(b"31");
    assert_eq!(w.send(&d, 100), Step::Queued);
    assert_eq!(
        w.sent(),
        vec![(
            'Q',
            "PREPARE sluice_deallocate_1 AS SELECT; DEALLOCATE sluice_deallocate_1".into()
        )]
    );
    // A statement the client does not have: PostgreSQL answers the error itself.
    w.send(&query("deallocate nope"), 100);
    assert_eq!(w.sent(), vec![('Q', "deallocate nope".into())]);
}

#[test]
fn discard_all_forgets_what_the_connection_had_prepared() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    w.answer_all(b"31");
    w.sent();
    w.send(&query("DISCARD ALL"), 100);
    assert_eq!(w.sent(), vec![('Q', "DISCARD ALL".into())]);
    assert!(w.server.is_empty());
    // A Bind after it (same pipeline) prepares the statement again.
    w.send(&bind("s1"), 100);
    let name = server_name(SQL, &[0, 0]).to_string();
    assert_eq!(
        w.sent(),
        vec![('C', name.clone()), ('P', name.clone()), ('B', name)]
    );
}

#[test]
fn a_parse_of_a_shared_statement_mid_batch_is_probed_and_its_binds_wait() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    w.answer_all(b"31");
    w.sent();
    w.client = ClientStatements::default();
    // An earlier message is unanswered: the transaction may fail before this Parse.
    w.tracker.push(crate::tracker::Pending::Execute);
    w.send(&parse("s2", SQL), 100);
    let probe = format!("{}_probe", server_name(SQL, &[0, 0]));
    assert_eq!(w.sent(), vec![('P', probe.clone()), ('C', probe)]);
    assert_eq!(w.send(&bind("s2"), 100), Step::Hold);
    assert_eq!(w.sent(), vec![('H', String::new())]);
}

#[test]
fn a_bind_after_a_sync_waits_for_the_clients_own_parse() {
    let mut w = World::default();
    w.send(&parse("s1", SQL), 100);
    // Same batch: if the Parse fails the server skips the Bind with it.
    assert_eq!(w.send(&bind("s1"), 100), Step::Queued);
    w.sent();
    w.tracker.push(crate::tracker::Pending::Sync);
    // Next batch: if the Parse fails, PostgreSQL answers this Bind (and a Describe of
    // the statement) "does not exist", which only the Parse's answer tells.
    assert_eq!(w.send(&bind("s1"), 100), Step::Hold);
    let describe = frame(
        Describe {
            target: Target::Statement,
            name: "s1".into(),
        }
        .encode(),
    );
    assert_eq!(w.send(&describe, 100), Step::Hold);
    assert_eq!(w.sent(), vec![('H', String::new()), ('H', String::new())]);
    // The Parse failed (an aborted transaction refused it): the Bind goes by the
    // client's name, for PostgreSQL's own 26000.
    w.tracker.on_message(b'3', 0);
    w.tracker.on_message(b'E', 0);
    w.tracker.on_message(b'Z', b'E');
    for name in w.tracker.forget_clients.drain(..) {
        w.client.remove(&name);
    }
    assert_eq!(w.send(&bind("s1"), 100), Step::Queued);
    assert_eq!(w.sent(), vec![('B', "s1".into())]);
}
