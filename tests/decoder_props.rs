//! Properties of the message decoder and the canonical form, checked on
//! generated input (a bounded number of cases, so this runs in CI every time).

use proptest::prelude::*;
use scramjet::{
    domain::canonical,
    domain::entity::{EntityId, EntityType},
    domain::message::{self, Action, Limits},
};
use serde_json::Value;

/// Arbitrary JSON values, numbers included as literal text (big and exotic ones too).
fn json_value() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?",
    ];
    let string = any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap());
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number,
        string,
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((any::<String>(), inner), 0..6).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{}: {v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{ {} }}", members.join(" , "))
            }),
        ]
    })
}

fn shuffled_object(value: &Value, seed: u64) -> String {
    // Re-serialize objects with keys in a seed-dependent order and spacing.
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by_key(|(k, _)| {
                let mut h = seed;
                for b in k.bytes() {
                    h = h.wrapping_mul(31).wrapping_add(b as u64);
                }
                h
            });
            let parts: Vec<String> = members
                .into_iter()
                .map(|(k, v)| {
                    format!(
                        "{}:\n {}",
                        serde_json::to_string(k).unwrap(),
                        shuffled_object(v, seed)
                    )
                })
                .collect();
            format!("{{  {} }}", parts.join(" ,\t"))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(|v| shuffled_object(v, seed)).collect();
            format!("[ {} ]", parts.join(", "))
        }
        other => canonical::to_canonical(other),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_end_as_a_message_or_a_reason(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        match message::decode(&body, Limits::default()) {
            Ok(m) => prop_assert!(EntityType::parse(m.entity_type.as_str()).is_ok() && EntityId::parse(m.id.as_str()).is_ok()),
            Err(reason) => prop_assert!(!reason.0.is_empty() && !reason.0.contains('\n')),
        }
    }

    #[test]
    fn arbitrary_json_bodies_never_panic(data in json_value(), action in "(save|delete|[a-z]{0,6})", t in "[A-Za-z.#*]{0,70}", id in any::<String>()) {
        let body = format!(
            r#"{{"action":{},"type":{},"id":{},"data":{data}}}"#,
            serde_json::to_string(&action).unwrap(),
            serde_json::to_string(&t).unwrap(),
            serde_json::to_string(&id).unwrap(),
        );
        match message::decode(body.as_bytes(), Limits::default()) {
            Ok(m) => {
                prop_assert_eq!(&m.entity_type, &t);
                prop_assert_eq!(&m.id, &id);
                if let Action::Save { data: map } = &m.action {
                    // What the decoder accepts, the canonical form reproduces exactly.
                    let text = canonical::object_to_canonical(map);
                    let again: Value = serde_json::from_str(&text).unwrap();
                    prop_assert_eq!(canonical::to_canonical(&again), text);
                }
            }
            Err(reason) => prop_assert!(!reason.0.contains('\n')),
        }
    }

    #[test]
    fn key_order_and_whitespace_never_change_the_hash(data in json_value(), seed in any::<u64>()) {
        let value: Value = serde_json::from_str(&data).unwrap();
        let reshaped: Value = serde_json::from_str(&shuffled_object(&value, seed)).unwrap();
        let a = canonical::to_canonical(&value);
        prop_assert_eq!(canonical::hash(&a), canonical::hash(&canonical::to_canonical(&reshaped)));
    }
}
