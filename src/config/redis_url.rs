//! A `redis://` or `rediss://` URL, read into where and how to connect.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Where and how to connect, parsed from `redis://[user:password@]host[:port][/db]`
/// (`rediss://` for TLS). The user and password may be percent-encoded (`%40` for `@`).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("rediss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("redis://") {
            (false, r)
        } else {
            // The URL may carry a password: only its scheme is shown.
            let scheme = url.split_once("://").map_or("", |(s, _)| s);
            return Err(if scheme.is_empty() {
                "is not a URL; write redis://host:6379 (or rediss:// for TLS)".to_owned()
            } else {
                format!("a {scheme}:// URL; write redis://host:6379 (or rediss:// for TLS)")
            });
        };
        if rest.contains(['?', '#']) {
            return Err("has a query or fragment, which ezgate does not read; remove it".into());
        }
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse()
                    .map_err(|_| format!("\"/{db}\" is not a database number"))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = split_host_port(hostport)?;
        if host.is_empty() {
            return Err("has no host".into());
        }
        let decode = |s: &str, what: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("its {what} is not UTF-8 once percent-decoded"))
        };
        let (username, password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (
                    (!u.is_empty())
                        .then(|| decode(u, "user name"))
                        .transpose()?,
                    Some(decode(p, "password")?),
                ),
                None => (None, Some(decode(a, "password")?)),
            },
            None => (None, None),
        };
        Ok(RedisTarget {
            host: host.to_owned(),
            port,
            tls,
            username,
            password,
            db,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults to 6379.
fn split_host_port(s: &str) -> Result<(&str, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("\"{p}\" is not a port"))
    };
    if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| "has an IPv6 address without its closing ]".to_owned())?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, port(p)?)),
            None if after.is_empty() => Ok((host, 6379)),
            None => Err(format!("has \"{after}\" after the IPv6 address")),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((h, port(p)?)),
        None => Ok((s, 6379)),
    }
}

/// The URL without its password: `rediss://user:<redacted>@host:6380/2`.
impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "rediss://" } else { "redis://" })?;
        match (&self.username, &self.password) {
            (Some(u), _) => write!(f, "{u}:<redacted>@")?,
            (None, Some(_)) => f.write_str(":<redacted>@")?,
            (None, None) => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisTarget({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = RedisTarget::parse("rediss://user:pw@cache.internal:6380/2").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port, t.db), ("cache.internal", 6380, 2));
        assert_eq!(
            (t.username.as_deref(), t.password.as_deref()),
            (Some("user"), Some("pw"))
        );
        let t = RedisTarget::parse("redis://127.0.0.1").unwrap();
        assert_eq!((t.port, t.tls, t.password), (6379, false, None));
        let t = RedisTarget::parse("redis://:p%40ss%3Aword@[::1]:7000/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("::1", 7000, 0));
        assert_eq!(
            (t.username, t.password.as_deref()),
            (None, Some("p@ss:word"))
        );
        assert_eq!(RedisTarget::parse("redis://[::1]").unwrap().port, 6379);
        assert_eq!(
            RedisTarget::parse("redis://app:p@w@h/1")
                .unwrap()
                .password
                .as_deref(),
            Some("p@w"),
            "the last @ ends the credentials"
        );
    }

    #[test]
    fn refuses_what_it_cannot_use_without_echoing_secrets() {
        for (url, says) in [
            ("http://u:secret@x", "a http:// URL"),
            ("secret", "is not a URL"),
            ("redis://h:port", "\"port\" is not a port"),
            ("redis://h/x", "\"/x\" is not a database number"),
            ("redis://:secret@/0", "has no host"),
            ("redis://h?protocol=resp3", "query"),
            ("redis://[::1", "closing ]"),
        ] {
            let e = RedisTarget::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: {e}");
        }
    }

    #[test]
    fn shows_no_password() {
        let t = RedisTarget::parse("rediss://app:hunter2@cache:6380/3").unwrap();
        assert_eq!(t.to_string(), "rediss://app:<redacted>@cache:6380/3");
        assert_eq!(
            format!("{t:?}"),
            "RedisTarget(rediss://app:<redacted>@cache:6380/3)"
        );
        let t = RedisTarget::parse("redis://:hunter2@[::1]").unwrap();
        assert_eq!(t.to_string(), "redis://:<redacted>@[::1]:6379");
    }
}
