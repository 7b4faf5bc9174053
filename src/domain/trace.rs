//! W3C Trace Context (`traceparent`, `tracestate`), carried from an inbound
//! message's AMQP headers (where OpenTelemetry's messaging conventions put
//! them) onto the events that message causes.

/// Longest `tracestate` kept: the W3C recommendation's 512 characters.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// A valid `traceparent`, and the `tracestate` that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `version-traceid-parentid-flags`, as received.
    pub traceparent: String,
    /// As received, when printable ASCII of at most
    /// [`MAX_TRACESTATE_BYTES`]; else left out.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of a message whose headers carry `traceparent` and
    /// `tracestate`; `None` unless `traceparent` is valid (W3C Trace
    /// Context, level 1): a receiver must then ignore both.
    pub fn parse(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<TraceContext> {
        let traceparent = traceparent?.trim_matches([' ', '\t']);
        if !valid_traceparent(traceparent) {
            return None;
        }
        let tracestate = tracestate
            .map(|s| s.trim_matches([' ', '\t']))
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE_BYTES
                    && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
            })
            .map(str::to_owned);
        Some(TraceContext {
            traceparent: traceparent.to_owned(),
            tracestate,
        })
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>` (lowercase, ids not all zeros); a later
/// version (not `ff`) may append `-…` fields, which are kept as they are.
fn valid_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    if b.len() < 55 || !s.is_ascii() {
        return false;
    }
    let version_ok = hex(0..2) && &b[0..2] != b"ff";
    let shape_ok = b[2] == b'-' && b[35] == b'-' && b[52] == b'-';
    let ids_ok = hex(3..35) && !zeros(3..35) && hex(36..52) && !zeros(36..52) && hex(53..55);
    let length_ok = if &b[0..2] == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    };
    version_ok && shape_ok && ids_ok && length_ok && b.len() <= 512
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_with_its_tracestate() {
        let t = TraceContext::parse(Some(GOOD), Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"))
            .unwrap();
        assert_eq!(t.traceparent, GOOD);
        assert_eq!(
            t.tracestate.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        // A later version may carry more fields.
        let later = format!("cc-{}-what-the-future-holds", &GOOD[3..]);
        assert!(TraceContext::parse(Some(&later), None).is_some());
    }

    #[test]
    fn an_invalid_traceparent_drops_both_and_a_bad_tracestate_drops_only_itself() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(TraceContext::parse(Some(bad), Some("a=b")), None, "{bad:?}");
        }
        assert_eq!(TraceContext::parse(None, Some("a=b")), None);
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE_BYTES);
        for state in [long.as_str(), "a=\u{7}", "a=é", ""] {
            let t = TraceContext::parse(Some(GOOD), Some(state)).unwrap();
            assert_eq!(t.tracestate, None, "{state:?}");
        }
    }
}
