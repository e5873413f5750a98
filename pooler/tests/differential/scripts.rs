//! Seeded generator of client scripts for the differential harness: simple and
//! extended queries, pipelining, COPY in and out (with Syncs, errors and stray messages
//! where a careless or hostile client puts them), errors mid-batch, Flush/Sync
//! placement, DEALLOCATE/DISCARD variants and Terminate.
//!
//! Every script only touches its own table (`dt<client>`), so what each client receives
//! does not depend on how the clients interleave: PostgreSQL's answer is the oracle.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::wire::*;

/// What one client sends: each write is one `write_all` of one or more messages.
#[derive(Debug, Clone)]
pub struct Script {
    pub client: usize,
    pub writes: Vec<Vec<u8>>,
    /// Readable description of each write, for failure reports.
    pub notes: Vec<String>,
    /// Ends with Terminate (pipelined after its last write) instead of the end marker.
    pub terminate: bool,
    /// Ends with a protocol violation after which PostgreSQL closes the connection
    /// (FATAL): nothing is written after it, so no write races the close (a reset
    /// would discard what the client has not read yet).
    pub fatal_end: bool,
    /// Milliseconds to pause after each write.
    pub pauses: Vec<u64>,
}

/// Which statements a script may use: transaction pooling cannot carry session state
/// (SET, session advisory locks, SQL-level PREPARE), so those are left out for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Transaction,
    Session,
}

struct Gen {
    rng: StdRng,
    client: usize,
    table: String,
    /// Named statements the script has prepared (and not closed).
    named: Vec<String>,
    next_name: usize,
    flavor: Flavor,
    /// The last step ends the session (see [`Script::fatal_end`]).
    fatal: bool,
}

/// The script of client `client` for `seed`.
pub fn script(seed: u64, client: usize, flavor: Flavor) -> Script {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed.wrapping_mul(1_000_003) ^ client as u64),
        client,
        table: format!("dt{client}"),
        named: Vec::new(),
        next_name: 0,
        flavor,
        fatal: false,
    };
    let mut s = Script {
        client,
        writes: Vec::new(),
        notes: Vec::new(),
        terminate: false,
        fatal_end: false,
        pauses: Vec::new(),
    };
    let writes = g.rng.random_range(3..12);
    for _ in 0..writes {
        let mut w = Vec::new();
        let mut notes = Vec::new();
        for _ in 0..g.rng.random_range(1..4) {
            let (bytes, note) = g.step();
            w.extend_from_slice(&bytes);
            notes.push(note);
            if g.fatal {
                break;
            }
        }
        s.writes.push(w);
        s.notes.push(notes.join(" | "));
        s.pauses.push(if g.rng.random_bool(0.3) {
            g.rng.random_range(0..20)
        } else {
            0
        });
        if g.fatal {
            s.fatal_end = true;
            return s;
        }
    }
    if g.rng.random_bool(0.15) {
        // A pipelined write right before Terminate must not be lost.
        let n = g.rng.random_range(1000..2000);
        s.writes
            .push(query(&format!("insert into {} values ({n})", g.table)));
        s.notes.push(format!("insert {n}, then Terminate"));
        s.pauses.push(0);
        s.terminate = true;
    }
    s
}

impl Gen {
    fn n(&mut self) -> i32 {
        self.rng.random_range(0..100)
    }

    /// One step: its messages and a note.
    fn step(&mut self) -> (Vec<u8>, String) {
        let t = self.table.clone();
        let c = self.client;
        let n = self.n();
        match self.rng.random_range(0..20) {
            0 => simple(format!("select {n}, 'c{c}'")),
            1 => simple(format!("select {n}; select 1/0; select 'c{c}'")),
            2 => simple(format!("insert into {t} values ({n})")),
            3 => simple(format!(
                "select count(*), coalesce(sum(x), 0), 'c{c}' from {t}"
            )),
            4 => simple(
                ["begin", "commit", "rollback", "begin; select 1", "end"]
                    [self.rng.random_range(0..5)]
                .to_string(),
            ),
            5 => simple(format!(
                "copy (select g, 'c{c}' from generate_series(1, {n}) g) to stdout"
            )),
            6 | 7 => self.copy_in(),
            8..=11 => self.extended(),
            12 => self.extended_copy(),
            13 => simple(format!("select pg_sleep(0.00{}), 'c{c}'", n % 10)),
            14 => simple(String::new()),
            15 => simple(format!(
                "savepoint a; insert into {t} values ({n}); rollback to a"
            )),
            16 => self.deallocate(),
            17 => simple(format!("select 'c{c}' from {t}_missing")),
            18 if self.flavor == Flavor::Session => simple(format!(
                "set application_name = 'c{c}'; show application_name"
            )),
            _ => simple(format!(
                "do $$ begin raise notice 'c{c} {n}'; end $$; select {n}"
            )),
        }
    }

    /// COPY FROM STDIN in the simple protocol, with every end a client may give it.
    fn copy_in(&mut self) -> (Vec<u8>, String) {
        let t = self.table.clone();
        let mut b = query(&format!("copy {t} from stdin"));
        let mut note = format!("Q(copy {t} from stdin)");
        let rows = self.rng.random_range(0..4);
        for _ in 0..rows {
            let n = self.n();
            b.extend_from_slice(&copy_data(format!("{n}\n").as_bytes()));
        }
        note.push_str(&format!(" d×{rows}"));
        match self.rng.random_range(0..10) {
            0 => {
                b.extend_from_slice(&copy_data(b"not a number\n"));
                b.extend_from_slice(&copy_done());
                note.push_str(" d(bad) c");
            }
            1 => {
                b.extend_from_slice(&copy_fail("client gave up"));
                note.push_str(" f");
            }
            2 => {
                // Careless: Sync and Flush inside the COPY (ignored unless it fails).
                b.extend_from_slice(&sync());
                b.extend_from_slice(&flush());
                if self.rng.random_bool(0.5) {
                    b.extend_from_slice(&copy_data(b"oops\n"));
                    note.push_str(" S H d(bad)");
                } else {
                    note.push_str(" S H");
                }
                b.extend_from_slice(&copy_done());
                note.push_str(" c");
            }
            3 => {
                // Hostile: a query inside the COPY; PostgreSQL ends the session. Nothing
                // after it: bytes PostgreSQL never reads make its close a reset, which
                // can discard its last answers before the client reads them (a
                // divergence of the oracle, seen once in an hour of fuzzing).
                b.extend_from_slice(&query("select 'inside copy'"));
                note.push_str(" Q (FATAL)");
                self.fatal = true;
                return (b, note);
            }
            _ => {
                b.extend_from_slice(&copy_done());
                note.push_str(" c");
            }
        }
        if self.rng.random_bool(0.3) {
            // A Sync after CopyDone is answered (the cross-client leak of issue 15).
            b.extend_from_slice(&sync());
            note.push_str(" S");
        }
        (b, note)
    }

    /// An extended-protocol batch: Parse (named or unnamed), Bind, Describe, Execute,
    /// ended by Sync, or by Flush with the Sync later.
    fn extended(&mut self) -> (Vec<u8>, String) {
        let c = self.client;
        let k = self.n();
        let mut b = Vec::new();
        let mut note = String::new();
        let name = if !self.named.is_empty() && self.rng.random_bool(0.4) {
            let i = self.rng.random_range(0..self.named.len());
            note.push_str(&format!("reuse {} ", self.named[i]));
            self.named[i].clone()
        } else if self.rng.random_bool(0.5) {
            let name = format!("s{}", self.next_name);
            self.next_name += 1;
            let sql = format!("select $1::int + {k}, 'c{c}'");
            b.extend_from_slice(&parse(&name, &sql));
            note.push_str(&format!("P({name}: {sql}) "));
            self.named.push(name.clone());
            name
        } else {
            let sql = match self.rng.random_range(0..3) {
                0 => format!("select $1::int * 2, 'c{c}'"),
                1 => format!("insert into {} values ($1::int)", self.table),
                _ => "select 1/($1::int - $1::int)".to_string(),
            };
            b.extend_from_slice(&parse("", &sql));
            note.push_str(&format!("P({sql}) "));
            String::new()
        };
        if !name.is_empty() && self.rng.random_bool(0.2) {
            b.extend_from_slice(&describe(b'S', &name));
            note.push_str("D(S) ");
        }
        let param = match self.rng.random_range(0..8) {
            0 => "x".to_string(),
            _ => self.n().to_string(),
        };
        b.extend_from_slice(&bind("", &name, &[Some(&param)]));
        b.extend_from_slice(&describe(b'P', ""));
        b.extend_from_slice(&execute("", 0));
        note.push_str(&format!("B({param}) D(P) E "));
        match self.rng.random_range(0..6) {
            0 => {
                b.extend_from_slice(&flush());
                b.extend_from_slice(&sync());
                note.push_str("H S");
            }
            1 => {
                // A second execution in the same batch, then Sync.
                b.extend_from_slice(&bind("", &name, &[Some("7")]));
                b.extend_from_slice(&execute("", 0));
                b.extend_from_slice(&sync());
                note.push_str("B(7) E S");
            }
            3 if k % 3 == 0 => {
                // A simple query before the Sync: PostgreSQL runs it, or discards it
                // when a message before it failed.
                b.extend_from_slice(&query(&format!("select 'c{c} q'")));
                b.extend_from_slice(&sync());
                note.push_str("Q S");
            }
            2 if !name.is_empty() => {
                b.extend_from_slice(&close(b'S', &name));
                b.extend_from_slice(&sync());
                self.named.retain(|n| *n != name);
                note.push_str("C(S) S");
            }
            _ => {
                b.extend_from_slice(&sync());
                note.push('S');
            }
        }
        (b, note)
    }

    /// COPY FROM STDIN through the extended protocol, as tokio-postgres sends it:
    /// Bind, Execute, Sync, then the data, then CopyDone (or CopyFail) and Sync.
    fn extended_copy(&mut self) -> (Vec<u8>, String) {
        let mut b = parse("", &format!("copy {} from stdin", self.table));
        b.extend_from_slice(&bind("", "", &[]));
        b.extend_from_slice(&execute("", 0));
        b.extend_from_slice(&sync());
        let mut note = "P(copy) B E S".to_string();
        let n = self.n();
        b.extend_from_slice(&copy_data(format!("{n}\n").as_bytes()));
        match self.rng.random_range(0..4) {
            0 => {
                b.extend_from_slice(&copy_data(b"bad\n"));
                b.extend_from_slice(&copy_done());
                note.push_str(" d d(bad) c S");
            }
            1 => {
                b.extend_from_slice(&copy_fail("no"));
                note.push_str(" d f S");
            }
            _ => {
                b.extend_from_slice(&copy_done());
                note.push_str(" d c S");
            }
        }
        b.extend_from_slice(&sync());
        (b, note)
    }

    /// DEALLOCATE / DISCARD in the forms clients send them.
    fn deallocate(&mut self) -> (Vec<u8>, String) {
        let sql = match self.rng.random_range(0..4) {
            0 => "deallocate all".to_string(),
            1 => "DISCARD ALL".to_string(),
            2 => match self.named.pop() {
                Some(n) => format!("deallocate {n}"),
                None => "deallocate nothing_here".to_string(),
            },
            _ => "deallocate prepare all".to_string(),
        };
        if sql.to_ascii_lowercase().contains(" all") {
            self.named.clear();
        }
        simple(sql)
    }
}

fn simple(sql: String) -> (Vec<u8>, String) {
    (query(&sql), format!("Q({sql})"))
}
