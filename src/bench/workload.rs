//! The workloads: message bodies and the events and rows each must cause.

use std::collections::HashMap;

/// One message of a workload and what it must cause.
#[derive(Debug, Clone)]
pub(super) struct Op {
    pub(super) body: String,
    /// Whether it must publish an event.
    pub(super) event: bool,
}

/// A workload: messages, and the rows of its type when all are applied.
pub(super) struct Workload {
    pub(super) entity_type: String,
    pub(super) ops: Vec<Op>,
    pub(super) rows: i64,
}

impl Workload {
    pub(super) fn events(&self) -> usize {
        self.ops.iter().filter(|o| o.event).count()
    }
}

pub(super) fn document(id: usize, round: usize, size: usize) -> String {
    let head = format!(
        r#"{{"name":"Entity {id}","round":{round},"big":12345678901234567890123,"tags":["a","b"],"filler":""#
    );
    // The whole message body is about `size` bytes.
    let filler = size.saturating_sub(head.len() + 80);
    let mut doc = head;
    doc.extend(std::iter::repeat_n(
        (b'a' + (round % 26) as u8) as char,
        filler,
    ));
    doc.push_str("\"}");
    doc
}

pub(super) fn save(t: &str, id: usize, round: usize, size: usize) -> String {
    format!(
        r#"{{"action":"save","type":"{t}","id":"e{id:08}","data":{}}}"#,
        document(id, round, size)
    )
}

pub(super) fn delete(t: &str, id: usize) -> String {
    format!(r#"{{"action":"delete","type":"{t}","id":"e{id:08}"}}"#)
}

/// Half the messages create new ids, half update ids created about one
/// batch earlier; every message causes an event.
pub(super) fn creates_and_updates(t: &str, n: usize, size: usize) -> Workload {
    let mut ops = Vec::with_capacity(n);
    let mut created = 0;
    let mut updated = 0;
    for i in 0..n {
        if i % 2 == 0 {
            ops.push(Op {
                body: save(t, created, 0, size),
                event: true,
            });
            created += 1;
        } else {
            let id = if created > 250 {
                created - 250
            } else {
                updated % created
            };
            ops.push(Op {
                body: save(t, id, 1 + updated, size),
                event: true,
            });
            updated += 1;
        }
    }
    Workload {
        entity_type: t.to_owned(),
        ops,
        rows: created as i64,
    }
}

/// Saves of exactly the stored content of `creates_and_updates(t, n, size)`:
/// no events at all.
pub(super) fn unchanged_of(previous: &Workload) -> Workload {
    // Re-send the last save of every id.
    let mut last: HashMap<String, String> = HashMap::new();
    for op in &previous.ops {
        let id_start = op.body.find("\"id\":\"").expect("bodies have ids") + 6;
        let id = op.body[id_start..id_start + 9].to_owned();
        last.insert(id, op.body.clone());
    }
    let mut ops: Vec<Op> = last
        .into_values()
        .map(|body| Op { body, event: false })
        .collect();
    ops.sort_by(|a, b| a.body.cmp(&b.body));
    Workload {
        entity_type: previous.entity_type.clone(),
        ops,
        rows: previous.rows,
    }
}

/// 10 % deletes of existing ids, the rest creates and updates.
pub(super) fn with_deletes(t: &str, n: usize, size: usize) -> Workload {
    let mut ops = Vec::with_capacity(n);
    let mut alive: Vec<usize> = Vec::new();
    let mut next = 0;
    let mut round = 1;
    for i in 0..n {
        if i % 10 == 9 && alive.len() > 300 {
            let id = alive.swap_remove(alive.len() - 300);
            ops.push(Op {
                body: delete(t, id),
                event: true,
            });
        } else if i % 2 == 0 || alive.len() < 300 {
            ops.push(Op {
                body: save(t, next, 0, size),
                event: true,
            });
            alive.push(next);
            next += 1;
        } else {
            let id = alive[alive.len() - 250];
            ops.push(Op {
                body: save(t, id, round, size),
                event: true,
            });
            round += 1;
        }
    }
    Workload {
        entity_type: t.to_owned(),
        rows: alive.len() as i64,
        ops,
    }
}
