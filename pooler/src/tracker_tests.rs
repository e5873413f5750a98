//! Tracker tests on message sequences, each checked against what PostgreSQL does.

use super::*;

#[test]
fn swallows_injected_and_synthesises_skipped_in_order() {
    let mut t = Tracker::default();
    // Client: Parse s1 (already on server) + Bind + Execute + Sync.
    t.push(Pending::SynthParse("s1".into()));
    // Pooler injects a Parse for another statement before a Bind.
    t.push(Pending::Parse {
        name: Some("x".into()),
        client: None,
        swallow: true,
    });
    t.push(Pending::Bind(None));
    t.push(Pending::Execute);
    t.push(Pending::Sync);
    let mut out = Vec::new();
    assert!(t.take_synth(&mut out));
    assert_eq!(out, parse_complete().to_vec());
    assert_eq!(t.on_message(b'1', 0), Verdict::Drop);
    assert_eq!(t.on_message(b'2', 0), Verdict::Keep);
    assert_eq!(t.on_message(b'D', 0), Verdict::Keep);
    assert_eq!(t.on_message(b'C', 0), Verdict::Keep);
    assert!(!t.is_settled());
    assert_eq!(t.on_message(b'Z', b'I'), Verdict::Keep);
    assert!(t.is_settled());
}

#[test]
fn error_skips_to_sync_and_forgets_failed_parse() {
    let mut t = Tracker::default();
    t.push(Pending::Bind(None));
    t.push(Pending::Parse {
        name: Some("p".into()),
        client: Some("c".into()),
        swallow: false,
    });
    t.push(Pending::SynthClose("c1".into()));
    t.push(Pending::Sync);
    assert_eq!(t.on_message(b'E', 0), Verdict::Keep);
    assert_eq!(t.failed, vec![Arc::<str>::from("p")]);
    assert_eq!(t.forget_clients, vec![Arc::<str>::from("c")]);
    assert_eq!(t.skipped_closes, vec![Arc::<str>::from("c1")]);
    let mut out = Vec::new();
    assert!(
        !t.take_synth(&mut out),
        "skipped messages get no synthetic answer"
    );
    t.on_message(b'Z', b'E');
    assert!(t.is_settled());
    assert_eq!(t.status, TxStatus::Failed);
}

#[test]
fn simple_query_holds_until_ready() {
    let mut t = Tracker::default();
    t.push(Pending::Query);
    for tag in [b'T', b'D', b'C', b'E', b'C'] {
        assert_eq!(t.on_message(tag, 0), Verdict::Keep);
        assert!(!t.is_settled());
    }
    t.on_message(b'Z', b'T');
    assert!(t.is_settled());
    assert_eq!(t.status, TxStatus::InTransaction);
}

/// Replays server messages (tag, ReadyForQuery status) into `t`.
fn answer(t: &mut Tracker, msgs: &[(u8, u8)]) {
    for &(tag, status) in msgs {
        assert_eq!(t.on_message(tag, status), Verdict::Keep, "{}", tag as char);
    }
}

#[test]
fn extended_copy_in_ignores_syncs_sent_during_copy() {
    // tokio-postgres: Bind, Execute, Sync in one write; data; CopyDone, Sync.
    let mut t = Tracker::default();
    t.push(Pending::Bind(None));
    t.push(Pending::Execute);
    t.push(Pending::Sync);
    answer(&mut t, &[(b'2', 0), (b'G', 0)]);
    t.push(Pending::CopyEnd);
    assert!(!t.is_settled(), "the COPY needs a Sync after CopyDone");
    t.push(Pending::Sync);
    answer(&mut t, &[(b'C', 0)]);
    assert!(!t.is_settled());
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_settled(), "one ReadyForQuery settles it");
}

#[test]
fn copy_done_then_sync_then_query_in_one_write_waits_for_every_answer() {
    // The cross-client leak: Query(COPY FROM STDIN), CopyData, CopyDone, Sync,
    // Query(select) in one write. PostgreSQL answers G, C, Z (the COPY), Z (the Sync,
    // which came after CopyDone), then the select's T, D, C, Z.
    let mut t = Tracker::default();
    t.push(Pending::Query);
    t.push(Pending::CopyEnd);
    t.push(Pending::Sync);
    t.push(Pending::Query);
    answer(&mut t, &[(b'G', 0), (b'C', 0), (b'Z', b'I'), (b'Z', b'I')]);
    assert!(!t.is_settled(), "the select has not answered yet");
    answer(&mut t, &[(b'T', 0), (b'D', 0), (b'C', 0)]);
    assert!(!t.is_settled());
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_settled());
    assert!(!t.is_desynced());
}

#[test]
fn simple_copy_sent_before_its_response_with_two_statements() {
    // "copy a from stdin; copy b from stdin" with both data sets pipelined.
    let mut t = Tracker::default();
    t.push(Pending::Query);
    t.push(Pending::CopyEnd);
    t.push(Pending::CopyEnd);
    answer(&mut t, &[(b'G', 0), (b'C', 0), (b'G', 0), (b'C', 0)]);
    assert!(!t.is_settled());
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_settled());
}

#[test]
fn copy_messages_outside_a_copy_are_ignored_like_the_server_does() {
    let mut t = Tracker::default();
    t.push(Pending::CopyEnd);
    assert!(t.is_settled(), "nothing pending: the server ignores it");
    t.push(Pending::Query);
    t.push(Pending::CopyEnd);
    answer(&mut t, &[(b'T', 0), (b'D', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(
        t.is_settled(),
        "a CopyDone after a plain query owes nothing"
    );
}

#[test]
fn copy_fail_in_simple_mode_answers_error_then_ready() {
    let mut t = Tracker::default();
    t.push(Pending::Query);
    answer(&mut t, &[(b'G', 0)]);
    t.push(Pending::CopyEnd);
    answer(&mut t, &[(b'E', 0)]);
    assert!(!t.is_settled());
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_settled());
}

#[test]
fn error_during_extended_copy_without_pipelined_sync_is_in_step() {
    // Bind, Execute, Flush; the server fails the COPY; the client's Sync is answered.
    let mut t = Tracker::default();
    t.push(Pending::Bind(None));
    t.push(Pending::Execute);
    answer(&mut t, &[(b'2', 0), (b'G', 0), (b'E', 0)]);
    t.push(Pending::Sync);
    assert!(!t.is_settled(), "the Sync after the error is answered");
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_settled());
    t.push(Pending::Sync);
    assert!(!t.is_settled(), "later Syncs are tracked again");
}

#[test]
fn error_during_copy_with_a_sync_inside_desynchronises() {
    // Whether PostgreSQL read the pipelined Sync before or after the error decides
    // whether it is answered: the tracker must not guess.
    let mut t = Tracker::default();
    t.push(Pending::Bind(None));
    t.push(Pending::Execute);
    t.push(Pending::Sync);
    answer(&mut t, &[(b'2', 0), (b'G', 0), (b'E', 0)]);
    t.push(Pending::Sync);
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_desynced());
    assert!(!t.is_settled(), "never settled while desynchronised");
    assert!(t.ready_for_resync());
    t.start_resync("sluice_resync_1");
    assert!(!t.ready_for_resync());
    // A late ReadyForQuery for the Sync, then the barrier's answer.
    assert_eq!(t.on_resync_message(b"Z\0\0\0\x05I"), Verdict::Keep);
    assert_eq!(
        t.on_resync_message(b"T\0\0\0 \0\x01sluice_resync_1\0...."),
        Verdict::Drop
    );
    assert_eq!(
        t.on_resync_message(b"D\0\0\0\x0b\0\x01\0\0\0\x011"),
        Verdict::Drop
    );
    assert_eq!(t.on_resync_message(b"C\0\0\0\x0dSELECT 1\0"), Verdict::Drop);
    assert!(!t.is_settled());
    assert_eq!(t.on_resync_message(b"Z\0\0\0\x05I"), Verdict::Drop);
    assert!(t.is_settled(), "in step again after the barrier");
    assert!(!t.is_desynced());
}

#[test]
fn query_inside_a_copy_desynchronises_on_the_error() {
    let mut t = Tracker::default();
    t.push(Pending::Query);
    answer(&mut t, &[(b'G', 0)]);
    t.push(Pending::Query);
    t.push(Pending::CopyEnd);
    answer(&mut t, &[(b'E', 0), (b'Z', b'I')]);
    assert!(t.is_desynced());
    assert!(!t.is_settled());
}

#[test]
fn unexpected_responses_desynchronise() {
    let mut t = Tracker::default();
    answer(&mut t, &[(b'N', 0), (b'S', 0), (b'A', 0)]);
    assert!(t.is_settled(), "asynchronous messages may come at any time");
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_desynced(), "a ReadyForQuery nothing asked for");
    let mut t = Tracker::default();
    answer(&mut t, &[(b'D', 0)]);
    assert!(t.is_desynced(), "a row nothing asked for");
}

#[test]
fn unsynced_batch_is_not_settled() {
    let mut t = Tracker::default();
    t.push(Pending::Parse {
        name: None,
        client: None,
        swallow: false,
    });
    t.on_message(b'1', 0);
    assert!(!t.is_settled());
    t.push(Pending::Sync);
    t.on_message(b'Z', b'I');
    assert!(t.is_settled());
}

#[test]
fn injected_queries_are_swallowed_whole() {
    let mut t = Tracker::default();
    t.push(Pending::Injected);
    t.push(Pending::Query);
    assert!(t.front_swallows());
    for tag in [b'S', b'C', b'S', b'C'] {
        assert_eq!(t.on_message(tag, 0), Verdict::Drop);
    }
    assert_eq!(t.on_message(b'Z', b'I'), Verdict::Drop);
    assert!(!t.front_swallows());
    answer(&mut t, &[(b'T', 0), (b'D', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(t.is_settled());
}

#[test]
fn deallocate_swallows_the_prepare_and_drops_the_name_on_success() {
    let mut t = Tracker::default();
    t.push(Pending::Deallocate {
        client: "s1".into(),
        prepared: false,
    });
    assert!(t.front_swallows());
    assert_eq!(t.on_message(b'C', 0), Verdict::Drop, "PREPARE");
    assert_eq!(t.on_message(b'C', 0), Verdict::Keep, "DEALLOCATE");
    assert_eq!(t.forget_clients, vec![Arc::<str>::from("s1")]);
    answer(&mut t, &[(b'Z', b'I')]);
    assert!(t.is_settled());
    // In a failed transaction the server's error is the answer, and the name stays.
    let mut t = Tracker::default();
    t.push(Pending::Deallocate {
        client: "s1".into(),
        prepared: false,
    });
    answer(&mut t, &[(b'E', 0), (b'Z', b'E')]);
    assert!(t.is_settled());
    assert!(t.forget_clients.is_empty());
}

/// PostgreSQL discards every message after an extended-protocol error up to the next
/// Sync, simple queries and messages that arrive after the error included (found by
/// `make fuzz`, seed 12282773673744209491).
#[test]
fn error_discards_messages_sent_after_it_until_sync() {
    let mut t = Tracker::default();
    t.push(Pending::Parse {
        name: None,
        client: Some("s1".into()),
        swallow: false,
    });
    t.push(Pending::Query);
    assert_eq!(t.on_message(b'E', 0), Verdict::Keep);
    assert_eq!(t.forget_clients, vec![Arc::<str>::from("s1")]);
    // Sent after the error came: discarded by the server as well.
    t.push(Pending::Bind(None));
    t.push(Pending::SynthParse("s2".into()));
    t.push(Pending::Execute);
    t.push(Pending::Query);
    assert!(!t.has_synth());
    assert!(!t.answered());
    t.push(Pending::Sync);
    t.push(Pending::Query);
    assert_eq!(t.on_message(b'Z', b'I'), Verdict::Keep);
    assert_eq!(t.on_message(b'C', 0), Verdict::Keep);
    assert_eq!(t.on_message(b'Z', b'I'), Verdict::Keep);
    assert!(t.is_settled());
    assert!(!t.is_desynced());
    assert_eq!(t.forget_clients.len(), 2);
}

#[test]
fn a_parse_in_flight_counts_only_until_the_next_sync_point() {
    let mut t = Tracker::default();
    t.push(Pending::Parse {
        name: Some("s".into()),
        client: None,
        swallow: true,
    });
    t.push(Pending::Bind(None));
    // Later in the same segment: if the Parse fails, the server skips these too.
    assert!(!t.parse_unsettled_across_sync("s"));
    assert!(!t.parse_unsettled_across_sync("other"));
    t.push(Pending::Sync);
    // After the Sync: a failed Parse would leave a later segment without it.
    assert!(t.parse_unsettled_across_sync("s"));
    assert_eq!(t.on_message(b'1', 0), Verdict::Drop);
    assert!(
        !t.parse_unsettled_across_sync("s"),
        "answered: the statement exists"
    );
    let mut q = Tracker::default();
    q.push(Pending::Parse {
        name: Some("s".into()),
        client: None,
        swallow: true,
    });
    q.push(Pending::Query);
    assert!(q.parse_unsettled_across_sync("s"));
    // The client's own Parse: if it fails, its statement does not exist afterwards.
    let mut own = Tracker::default();
    own.push(Pending::Parse {
        name: Some("s".into()),
        client: Some("c".into()),
        swallow: false,
    });
    own.push(Pending::Sync);
    assert!(!own.parse_unsettled_across_sync("s"));
}
