//! Keeping credentials out of logs and error messages.

/// `url` with any password replaced by `***`. Works for URLs
/// (`scheme://user:pass@host/…`) and libpq key=value strings (`password=…`).
pub(crate) fn url(raw: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(raw)
        && parsed.has_host()
    {
        if parsed.password().is_some() {
            // Cannot fail for a URL with a host.
            let _ = parsed.set_password(Some("***"));
        }
        let mut pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if pairs.iter().any(|(k, _)| k == "password") {
            for (k, v) in &mut pairs {
                if k == "password" {
                    *v = "***".into();
                }
            }
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return parsed.to_string();
    }
    // key=value form: blank out the value after `password=` (quoted or not).
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find("password") {
        let (head, tail) = rest.split_at(at);
        out.push_str(head);
        let after = tail["password".len()..].trim_start();
        if let Some(value) = after.strip_prefix('=') {
            out.push_str("password=***");
            let value = value.trim_start();
            let end = if let Some(quoted) = value.strip_prefix('\'') {
                closing_quote(quoted).map_or(value.len(), |i| i + 2)
            } else {
                value.find(char::is_whitespace).unwrap_or(value.len())
            };
            rest = &value[end..];
        } else {
            out.push_str("password");
            rest = &tail["password".len()..];
        }
    }
    out.push_str(rest);
    out
}

/// Where the quote closing a libpq quoted value is, in `quoted` (what follows
/// the opening quote): `\'` and `\\` inside are escapes, not its end.
fn closing_quote(quoted: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/scramjet"),
            "postgres://postgres@127.0.0.1:5432/scramjet"
        );
        assert_eq!(
            url("postgres://u:s3cr%40t@db/x?password=other&sslmode=require"),
            "postgres://u:***@db/x?password=***&sslmode=require"
        );
    }

    #[test]
    fn passwords_in_key_value_strings_are_hidden() {
        assert_eq!(
            url("host=db password=s3cret user=u"),
            "host=db password=*** user=u"
        );
        assert_eq!(
            url("host=db password = 'a b' user=u"),
            "host=db password=*** user=u"
        );
        assert!(!url("password=x").contains('x'));
        // An escaped quote is part of the password, not its end.
        assert_eq!(
            url(r"host=db password='it\'s s3cret' user=u"),
            "host=db password=*** user=u"
        );
        assert_eq!(
            url(r"password='a\\' user=u"),
            "password=*** user=u",
            "an escaped backslash before the closing quote"
        );
    }
}
