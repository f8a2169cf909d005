//! Showing config values without their secrets: for status output, listings, errors, logs.
//!
//! Env and header values are never shown at all (callers show keys only); what is shown
//! (command arguments, URLs) goes through here first.

const SECRET_WORDS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "key",
    "auth",
    "credential",
    "bearer",
    "cookie",
    "session",
];

/// Flags whose next argument is a header or an environment assignment, shown masked.
const VALUE_FLAGS: &[&str] = &["--header", "-H", "-e", "--env", "--cookie", "-b"];

fn secretish(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| s.contains(w))
}

/// `NAME=***` or `Name: ***` for an assignment or a header line, else `***`.
fn masked(a: &str) -> String {
    match a.find(['=', ':']) {
        Some(at) if !a[..at].contains(' ') => {
            let sep = if a[at..].starts_with('=') { "=" } else { ": " };
            format!("{}{sep}***", &a[..at])
        }
        _ => "***".to_owned(),
    }
}

/// Masks one argument that carries its own secret: a URL with userinfo or query values,
/// `NAME=value` or `Name: value` with a secret-looking name.
fn one(a: &str) -> String {
    if a.contains("://") {
        return url(a);
    }
    match a.find(['=', ':']) {
        Some(at) if secretish(&a[..at]) => masked(a),
        _ => a.to_owned(),
    }
}

/// Masks secrets in command arguments: values of secret-looking flags (`--api-key X`,
/// `--token=X`), the argument after `--header`/`-H`/`-e`/`--env`, URLs' userinfo and query
/// values, and `NAME=value` / `Name: value` with a secret-looking name. `${VAR}` references
/// are not values and stay as written.
pub fn args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for a in args {
        let hide = std::mem::take(&mut hide_next);
        if a.contains("${") {
            out.push(a.clone());
        } else if hide {
            out.push(masked(a));
        } else if a.starts_with('-') && !a.contains("://") {
            // A flag: `--token=X` masks its value, `--token` / `--header` the next argument.
            match a.split_once('=') {
                Some((flag, _)) if secretish(flag) => out.push(format!("{flag}=***")),
                Some(_) => out.push(a.clone()),
                None => {
                    hide_next = secretish(a) || VALUE_FLAGS.contains(&a.as_str());
                    out.push(a.clone());
                }
            }
        } else {
            out.push(one(a));
        }
    }
    out
}

/// Masks a URL's userinfo and query values.
pub fn url(u: &str) -> String {
    let (base, query) = match u.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (u, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    match query {
        None => base,
        Some(q) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) => format!("{k}=***"),
                    None => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", q.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn masks_secrets_in_arguments() {
        let got = args(&v(&[
            "-y",
            "srv",
            "--api-key",
            "abc",
            "--token=xyz",
            "--name",
            "n",
            "--auth",
            "${TOKEN}",
            "--header",
            "Authorization: Bearer sk-1",
            "-e",
            "GITHUB_TOKEN=ghp_1",
            "postgresql://user:pw@db/x",
            "API_KEY=k",
            "plain=value",
        ]));
        assert_eq!(
            got,
            v(&[
                "-y",
                "srv",
                "--api-key",
                "***",
                "--token=***",
                "--name",
                "n",
                "--auth",
                "${TOKEN}",
                "--header",
                "Authorization: ***",
                "-e",
                "GITHUB_TOKEN=***",
                "postgresql://***@db/x",
                "API_KEY=***",
                "plain=value",
            ])
        );
    }

    #[test]
    fn masks_secrets_in_urls() {
        assert_eq!(
            url("https://user:pw@h.example/mcp?key=1&x"),
            "https://***@h.example/mcp?key=***&x"
        );
        assert_eq!(
            url("http://127.0.0.1:3000/mcp"),
            "http://127.0.0.1:3000/mcp"
        );
    }
}
