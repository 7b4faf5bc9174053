//! `scramjet run`: the daemon until SIGTERM or SIGINT, with the schemas
//! reloaded on SIGHUP.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::LOG_TARGET;
use crate::{config::Settings, daemon::App, domain::validate::Schemas};

/// Builds the daemon and runs it until the first SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(reload_on_sighup(app.schemas()));
    app.run(shutdown).await
}

/// Reloads the schemas on every SIGHUP; a broken schema keeps the old ones.
async fn reload_on_sighup(schemas: Arc<Schemas>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!(target: LOG_TARGET, "cannot listen for SIGHUP; schemas reload only on restart");
        return;
    };
    while hup.recv().await.is_some() {
        match schemas.reload() {
            Ok(types) => tracing::info!(target: LOG_TARGET, ?types, "SIGHUP: schemas reloaded"),
            Err(e) => {
                tracing::error!(target: LOG_TARGET, error = %e, "SIGHUP: schemas not reloaded; the previous ones stay in use")
            }
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT. A second SIGINT (an
/// impatient Ctrl-C) exits at once; further SIGTERMs are ignored, since
/// supervisors and wrappers may forward the same request more than once.
pub(super) async fn stop_on_signal(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(target: LOG_TARGET, "cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(target: LOG_TARGET, "SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!(target: LOG_TARGET, "SIGINT: shutting down"),
    }
    shutdown.cancel();
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!(target: LOG_TARGET, "SIGTERM again: already shutting down"),
            _ = int.recv() => {
                tracing::warn!(target: LOG_TARGET, "second SIGINT: exiting without finishing the batch (unacked messages are redelivered)");
                std::process::exit(130);
            }
        }
    }
}
