//! Secrets: values `Debug` never prints, and passwords given inline or in a file.

use anyhow::Context;
use serde::Deserialize;

/// A value that must never be printed: `Debug` shows `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The password of `section`, from the setting or from the file it names;
/// both at once is an error.
pub(super) fn resolve_password(
    section: &str,
    password: Option<&Secret>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    match (password, file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("invalid configuration: set {section} or {section}_file, not both")
        }
        (Some(p), None) => Ok(Some(p.0.clone())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {section}_file {}", path.display()))?;
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn passwords_come_from_settings_or_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut s = Settings::default();
        assert_eq!(s.postgres.password().unwrap(), None);
        s.postgres.password_file = Some(file.clone());
        assert_eq!(s.postgres.password().unwrap().as_deref(), Some("s3cret"));
        s.amqp.password = Some(Secret("other".into()));
        assert_eq!(s.amqp.password().unwrap().as_deref(), Some("other"));
        assert!(!format!("{s:?}").contains("other"));
        // Nor in URLs, nor the token.
        s.postgres.url = "postgres://u:pg-s3cret@db/x".into();
        s.amqp.url = "amqp://u:mq-s3cret@mq/%2f".into();
        s.http.bearer_token = Some(Secret("tok-s3cret".into()));
        let shown = format!("{s:?}");
        for secret in ["pg-s3cret", "mq-s3cret", "tok-s3cret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://u:***@db/x"), "{shown}");
        s.amqp.password_file = Some(file);
        assert!(
            s.amqp
                .password()
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
    }
}
