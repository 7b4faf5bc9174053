//! `[events]`: the form of the change events on the changes exchange.

use serde::Deserialize;

/// How an event's body is laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    /// CONTRACT §5's body, `content_type` `application/json`.
    #[default]
    Scramjet,
    /// A CloudEvents 1.0 event in structured content mode
    /// (`application/cloudevents+json`) whose `data` is the §5 body, with
    /// its attributes mirrored as `ce-*` AMQP headers.
    Cloudevents,
}

/// `[events]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// `scramjet` (the default) or `cloudevents`.
    pub format: EventFormat,
    /// The CloudEvents `source`, a URI reference; `None`:
    /// `/scramjet/<amqp.inbound_queue>`.
    pub source: Option<String>,
    /// Put before the op to make the CloudEvents `type`
    /// (`org.example.scramjet.` gives `org.example.scramjet.updated`).
    pub type_prefix: String,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            format: EventFormat::Scramjet,
            source: None,
            type_prefix: "scramjet.".into(),
        }
    }
}

impl EventSettings {
    /// The CloudEvents `source` of a daemon consuming `inbound_queue`.
    pub fn source_or_default(&self, inbound_queue: &str) -> String {
        self.source
            .clone()
            .unwrap_or_else(|| format!("/scramjet/{inbound_queue}"))
    }

    /// Refuses a `source` that is no URI reference (empty, or with spaces
    /// or control characters) and a `type_prefix` with those characters.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        let bad = |s: &str| s.chars().any(|c| c.is_whitespace() || c.is_control());
        if let Some(source) = &self.source {
            anyhow::ensure!(
                !source.is_empty() && !bad(source),
                "invalid configuration: events.source must be a URI reference \
                 (not empty, no spaces or control characters): {source:?}"
            );
            url::Url::parse("http://base.invalid/")
                .and_then(|base| base.join(source))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "invalid configuration: events.source is not a URI reference: {source:?}: {e}"
                    )
                })?;
        }
        anyhow::ensure!(
            !bad(&self.type_prefix),
            "invalid configuration: events.type_prefix must have no spaces or control \
             characters: {:?}",
            self.type_prefix
        );
        Ok(())
    }
}
