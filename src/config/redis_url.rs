//! A `redis://` or `rediss://` URL, read into where and how to connect.

/// Where and how to connect, parsed from `redis://[user:pass@]host:port[/db]`.
#[derive(Debug, Clone)]
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
            return Err("must start with redis:// or rediss://".into());
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, db)) if !db.is_empty() => (
                hp,
                db.parse()
                    .map_err(|_| format!("\"{db}\" is not a database number"))?,
            ),
            Some((hp, _)) => (hp, 0),
            None => (hostpart, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("\"{p}\" is not a port"))?),
            None => (hostport, 6379),
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let (username, password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
                None => (None, Some(a.to_owned())),
            },
            None => (None, None),
        };
        Ok(RedisTarget {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            tls,
            username,
            password,
            db,
        })
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
        assert!(RedisTarget::parse("http://x").is_err());
    }
}
