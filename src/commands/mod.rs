//! The subcommands of the `scramjet` binary, one module each, each with its
//! `clap` arguments and a `run`: the daemon (`run`), `migrate`, `relay`, and
//! the one-shot commands `send`, `status`, `tail`, `replay`, `revalidate`,
//! `ingest` and `delete`. (`bench` is [`crate::bench`].)

mod bulk;
pub mod delete;
pub mod ingest;
pub mod migrate;
pub mod relay;
pub mod replay;
pub mod revalidate;
pub mod run;
pub mod send;
pub mod status;
pub mod tail;

use crate::api::filter::{self, Filter};

/// The log target of what these commands log themselves: the binary's, where
/// the lines were logged before they moved into the library, so log filters
/// and readers see the same target as ever.
const LOG_TARGET: &str = "scramjet";

/// How a command's error is printed: the whole chain of causes, on one line.
pub fn error_line(error: &anyhow::Error) -> String {
    crate::amqp::one_line(&format!("{error:#}"))
}

/// The `--where` option, parsed.
fn parse_where(text: Option<&str>) -> anyhow::Result<Option<Filter>> {
    text.map(|t| filter::parse(t).map_err(|e| anyhow::anyhow!("--where: {e}")))
        .transpose()
}
