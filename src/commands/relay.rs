//! `scramjet relay`: move the outbox of a source database to the inbound
//! exchange until SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

use crate::{
    config::{Secret, Settings},
    producer::Relay,
};

/// The arguments of `scramjet relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// The source database, e.g. postgres://relay@db:5432/hr; overrides
    /// relay.source_url (SCRAMJET__RELAY__SOURCE_URL).
    #[arg(long, value_name = "URL")]
    pub source_url: Option<String>,
}

/// Runs the relay until the first SIGTERM or SIGINT.
pub async fn run(mut settings: Settings, args: RelayArgs) -> anyhow::Result<()> {
    if let Some(url) = args.source_url {
        settings.relay.source_url = Some(Secret(url));
    }
    let relay = Relay::build(settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::stop_on_signal(shutdown.clone()));
    relay.run(shutdown).await
}
