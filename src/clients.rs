//! Who is asking: client keys (held as SHA-256, compared in constant time), key
//! fingerprints, and per-client model allow-lists.
//!
//! In managed mode (`upstream.api_key` set) a request must present one of the clients'
//! keys. In passthrough mode the key the application presents goes upstream untouched;
//! `[[clients]]` only name the callers whose key they know, and any other key (or none) is
//! `other`: the upstream, not ezgate, judges it.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, Method};

use crate::config::ClientConfig;
use wildmatch::WildMatch;

use crate::errors::GatewayError;
use crate::route::{self, ModelAt};

/// A configured client, as held in memory.
#[derive(Debug)]
pub struct Client {
    pub name: Arc<str>,
    key_sha256: [u8; 32],
    /// The allow-list: globs with `*` (any run of characters) and `?` (one character).
    models: Vec<WildMatch>,
    /// The allow-list as configured, for the refusal's message.
    allowed: String,
    /// Routes the client may use although ezgate cannot read their model
    /// (`clients[].unchecked_routes`), matched against the canonical path.
    unchecked_routes: Vec<WildMatch>,
    /// Its claim on a scarce upstream quota (`upstream.quota.mode = "enforce"`).
    pub priority: crate::config::Priority,
    /// Whose costs this client's add up to (`clients[].team`).
    pub team: Option<Arc<str>>,
}

#[derive(Debug, Default)]
pub struct Clients {
    list: Vec<Arc<Client>>,
    /// Managed mode: with clients configured, a request without one of their keys is
    /// refused (401). Passthrough: it is let through, unnamed.
    key_required: bool,
}

/// The caller of one request, as far as ezgate knows it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The matched `[[clients]]` entry.
    pub client: Option<Arc<Client>>,
    /// A short fingerprint of the presented key, never the key itself.
    pub key_fingerprint: Option<Arc<str>>,
}

impl Caller {
    /// What the access log shows: the client name, else the key fingerprint.
    pub fn label(&self) -> Option<&str> {
        self.client
            .as_deref()
            .map(|c| &*c.name)
            .or(self.key_fingerprint.as_deref())
    }
}

impl Clients {
    /// The configured clients; `managed`: ezgate holds the organization's key
    /// (`upstream.api_key`), so a request must present one of the clients' keys.
    pub fn new(configs: &[ClientConfig], managed: bool) -> Clients {
        let list = configs
            .iter()
            .filter_map(|c| {
                let key_sha256 = parse_hex32(&c.key_sha256)?;
                Some(Arc::new(Client {
                    name: Arc::from(c.name.as_str()),
                    key_sha256,
                    models: c.models.iter().map(|m| WildMatch::new(m)).collect(),
                    allowed: c.models.join(", "),
                    unchecked_routes: c
                        .unchecked_routes
                        .iter()
                        .map(|r| WildMatch::new(r.strip_suffix('/').unwrap_or(r)))
                        .collect(),
                    priority: c.priority,
                    team: c.team.as_deref().map(Arc::from),
                }))
            })
            .collect();
        Clients {
            list,
            key_required: managed,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Identifies the caller by the key it presents (`Authorization: Bearer`). With clients
    /// configured in managed mode, a known key is required; in passthrough mode an unknown
    /// key, or none, identifies no client and is not refused.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        // Passthrough: the key ezgate judges the caller by must be the one the upstream
        // uses. With two, which one the upstream takes is its choice: a listed key behind an
        // unlisted one would escape its client's allow-list and limits.
        if !self.key_required && headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
            return Err(GatewayError::BadRequest(
                "the request has more than one Authorization header; send the key once".into(),
            ));
        }
        let (digest, key_fingerprint) = match bearer(headers) {
            Some(key) => {
                let (d, fp) = digest_of(key);
                (Some(d), Some(fp))
            }
            None => (None, None),
        };
        if self.list.is_empty() {
            return Ok(Caller {
                client: None,
                key_fingerprint,
            });
        }
        let Some(digest) = digest else {
            return match self.key_required {
                true => Err(GatewayError::MissingApiKey),
                false => Ok(Caller::default()),
            };
        };
        // Compare against every client, without stopping early, in constant time per compare.
        let mut found = None;
        for c in &self.list {
            if ct_eq(&c.key_sha256, &digest) {
                found = Some(Arc::clone(c));
            }
        }
        match found {
            Some(client) => Ok(Caller {
                client: Some(client),
                key_fingerprint,
            }),
            None if self.key_required => Err(GatewayError::InvalidApiKey),
            None => Ok(Caller {
                client: None,
                key_fingerprint,
            }),
        }
    }
}

impl Client {
    /// Checks the model allow-list; no list means every model.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), GatewayError> {
        self.check_model_at(model, "model")
    }

    /// [`Client::check_model`] for a model named at `field` of the request.
    fn check_model_at(&self, model: Option<&str>, field: &'static str) -> Result<(), GatewayError> {
        if self.models.is_empty() {
            return Ok(());
        }
        match model {
            Some(m) if self.models.iter().any(|p| p.matches(m)) => Ok(()),
            _ => Err(GatewayError::ModelNotAllowed {
                client: Arc::clone(&self.name),
                model: model.unwrap_or("(none)").chars().take(200).collect(),
                allowed: self.allowed.clone(),
                field,
            }),
        }
    }

    /// With an allow-list, a tool that spends a model must name it: the upstream's default
    /// (an `image_generation` tool without `model`) is on no list.
    pub fn check_unnamed_tool_model(&self) -> Result<(), GatewayError> {
        if self.models.is_empty() {
            return Ok(());
        }
        Err(GatewayError::ModelNotAllowed {
            client: Arc::clone(&self.name),
            model: "(none: a tool in `tools` spends a model but names none; set its `model`)"
                .into(),
            allowed: self.allowed.clone(),
            field: "tools[].model",
        })
    }

    pub fn has_model_list(&self) -> bool {
        !self.models.is_empty()
    }

    /// What the allow-list needs of the request `method path` (canonical path; `handshake`:
    /// a WebSocket handshake): `None` when nothing (no allow-list, or a request that spends
    /// no model), else where to read the model. A request that may spend a model ezgate
    /// cannot read is refused, unless the operator allowed its route for this client
    /// (`unchecked_routes`).
    pub fn model_check(
        &self,
        method: &Method,
        path: &str,
        handshake: bool,
    ) -> Result<Option<ModelAt>, GatewayError> {
        if self.models.is_empty() {
            return Ok(None);
        }
        let at = if handshake {
            route::handshake_model_at(path)
        } else {
            route::model_at(method, path)
        };
        match at {
            ModelAt::Nowhere => Ok(None),
            ModelAt::Unreadable(_) if self.may_leave_unchecked(path) => Ok(None),
            ModelAt::Unreadable(why) => Err(GatewayError::RouteNotAllowed {
                client: Arc::clone(&self.name),
                method: method.as_str().chars().take(20).collect(),
                path: shown(path),
                why,
            }),
            at => Ok(Some(at)),
        }
    }

    /// Checks every model the request names against the allow-list: `model`, the body's
    /// own (or the form's), and `nested`, those named inside the body (a tool's, a realtime
    /// session's, a transcription's); `at` is where the upstream takes the model from
    /// ([`Client::model_check`]), and `session_named` whether a client secret gave
    /// `session.model`, the one place its model is named. A request that names none there is refused where the upstream would then choose one
    /// itself, unless the operator allowed the route unchecked.
    pub fn check_named(
        &self,
        at: ModelAt,
        method: &Method,
        path: &str,
        model: Option<&str>,
        nested: &[String],
        session_named: bool,
    ) -> Result<(), GatewayError> {
        if let Some(m) = model {
            self.check_model(Some(m))?;
        }
        // Inside the body: a realtime session's model, or the models of Responses tools.
        let inside = match at {
            ModelAt::Session => "session.model",
            _ => "tools[].model",
        };
        for m in nested {
            self.check_model_at(Some(m), inside)?;
        }
        let (named, field) = match at {
            ModelAt::Session => (session_named, "session.model"),
            ModelAt::JsonIfPresent => (true, "model"),
            _ => (model.is_some(), "model"),
        };
        if named || self.may_leave_unchecked(path) {
            return Ok(());
        }
        Err(GatewayError::ModelMissing {
            client: Arc::clone(&self.name),
            method: method.as_str().chars().take(20).collect(),
            path: shown(path),
            allowed: self.allowed.clone(),
            field,
        })
    }

    fn may_leave_unchecked(&self, path: &str) -> bool {
        let path = path.strip_suffix('/').unwrap_or(path);
        self.unchecked_routes.iter().any(|r| r.matches(path))
    }
}

/// A request path as a refusal's message shows it: the client's own, cut short.
fn shown(path: &str) -> String {
    match path.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &path[..cut]),
        None => path.to_owned(),
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = v.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = v[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A key's SHA-256 and fingerprint. A sidecar sees few distinct keys, often one, so each
/// thread remembers the last key it hashed; a presented key is compared with it in constant
/// time (the remembered key may be another client's).
fn digest_of(key: &[u8]) -> ([u8; 32], Arc<str>) {
    type Last = Option<(Box<[u8]>, [u8; 32], Arc<str>)>;
    thread_local! {
        static LAST: std::cell::RefCell<Last> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, digest, fp)) = &*last {
            if ct_eq(seen, key) {
                return (*digest, Arc::clone(fp));
            }
        }
        let digest = sha256(key);
        let fp: Arc<str> = Arc::from(fingerprint(&digest));
        *last = Some((key.into(), digest, Arc::clone(&fp)));
        (digest, fp)
    })
}

/// Equality that takes the same time wherever the inputs differ (the lengths may show).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `fp:` and the first 12 hex digits of the key's SHA-256: stable, short, not reversible.
pub fn fingerprint(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(15);
    s.push_str("fp:");
    for b in &digest[..6] {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> Clients {
        configured(true)
    }

    fn configured(managed: bool) -> Clients {
        let hex: String = sha256(b"key-a")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Clients::new(
            &[ClientConfig {
                name: "team-a".into(),
                key_sha256: hex,
                models: vec!["gpt-4o*".into()],
                unchecked_routes: vec!["/v1/threads/*".into(), "/v1/batches/".into()],
                priority: Default::default(),
                team: None,
            }],
            managed,
        )
    }

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn identifies_known_keys_only() {
        let c = clients();
        let caller = c.identify(&auth("Bearer key-a")).unwrap();
        assert_eq!(caller.label(), Some("team-a"));
        assert!(matches!(
            c.identify(&auth("Bearer key-b")),
            Err(GatewayError::InvalidApiKey)
        ));
        assert!(matches!(
            c.identify(&HeaderMap::new()),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            c.identify(&auth("Basic abc")),
            Err(GatewayError::MissingApiKey)
        ));
    }

    #[test]
    fn passthrough_names_known_keys_and_lets_the_others_through() {
        let c = configured(false);
        let caller = c.identify(&auth("Bearer key-a")).unwrap();
        assert_eq!(caller.label(), Some("team-a"));
        assert!(caller.client.unwrap().has_model_list());
        // An unknown key: no client, its fingerprint (never the key) for the access log.
        let caller = c.identify(&auth("Bearer key-b")).unwrap();
        assert!(caller.client.is_none());
        assert_eq!(
            caller.label(),
            Some(fingerprint(&sha256(b"key-b")).as_str())
        );
        // No key, or not a bearer token: nobody, not refused.
        for h in [HeaderMap::new(), auth("Basic abc"), auth("Bearer  ")] {
            let caller = c.identify(&h).unwrap();
            assert!(caller.client.is_none() && caller.label().is_none(), "{h:?}");
        }
        // A key that only resembles the client's names nobody.
        for other in ["key-a2", "key-", "KEY-A", "kez-a"] {
            let caller = c.identify(&auth(&format!("Bearer {other}"))).unwrap();
            assert!(caller.client.is_none(), "{other:?}");
        }
        assert_eq!(
            c.identify(&auth("Bearer key-a ")).unwrap().label(),
            Some("team-a"),
            "the token is trimmed, as in managed mode"
        );
        // Two keys: which one the upstream would use is not ezgate's to guess.
        let mut two = auth("Bearer key-b");
        two.append(AUTHORIZATION, "Bearer key-a".parse().unwrap());
        for c in [configured(false), Clients::default()] {
            let e = c.identify(&two).unwrap_err();
            assert_eq!(e.code(), "bad_request");
            assert!(e.to_string().contains("more than one Authorization"), "{e}");
        }
        // Managed mode replaces them all with the organization's key: the first decides.
        assert!(matches!(
            configured(true).identify(&two),
            Err(GatewayError::InvalidApiKey)
        ));
    }

    #[test]
    fn model_allow_list() {
        let c = clients();
        let caller = c.identify(&auth("bearer key-a")).unwrap();
        let client = caller.client.unwrap();
        assert!(client.check_model(Some("gpt-4o-mini")).is_ok());
        assert!(client.check_model(Some("o1")).is_err());
        assert!(client.check_model(None).is_err());
    }

    #[test]
    fn routes_whose_model_cannot_be_read_are_refused_unless_allowed() {
        let caller = clients().identify(&auth("Bearer key-a")).unwrap();
        let client = caller.client.unwrap();
        let check = |m: &str, p: &str| {
            client.model_check(&Method::from_bytes(m.as_bytes()).unwrap(), p, false)
        };
        assert_eq!(
            client
                .model_check(&Method::GET, "/v1/realtime", true)
                .unwrap(),
            Some(ModelAt::Query)
        );
        let e = client
            .model_check(&Method::GET, "/v1/responses", true)
            .unwrap_err();
        assert_eq!(e.code(), "route_not_allowed");
        assert_eq!(
            check("POST", "/v1/chat/completions").unwrap(),
            Some(ModelAt::Json)
        );
        assert_eq!(
            check("POST", "/v1/images/edits").unwrap(),
            Some(ModelAt::Form)
        );
        assert_eq!(check("GET", "/v1/assistants").unwrap(), None);
        // Allowed unchecked: `*` spans segments, a trailing slash is ignored either side.
        assert_eq!(check("POST", "/v1/batches").unwrap(), None);
        assert_eq!(check("POST", "/v1/batches/").unwrap(), None);
        assert_eq!(
            check("POST", "/v1/threads/t/runs/r/submit_tool_outputs").unwrap(),
            None
        );
        let e = check("POST", "/v1/vector_stores").unwrap_err();
        assert_eq!(e.code(), "route_not_allowed");
        assert!(
            e.to_string()
                .contains("POST /v1/vector_stores is not allowed for client 'team-a'"),
            "{e}"
        );
        assert!(e.to_string().contains("clients.unchecked_routes"), "{e}");
        assert_eq!(
            check("PATCH", "/v1/chat/completions").unwrap_err().code(),
            "route_not_allowed"
        );
        // A readable route still checks what it names, allowed unchecked or not.
        let post = Method::POST;
        let runs = "/v1/threads/t/runs";
        assert!(client
            .check_named(ModelAt::Json, &post, runs, Some("gpt-4o"), &[], false)
            .is_ok());
        assert!(client
            .check_named(ModelAt::Json, &post, runs, Some("o1"), &[], false)
            .is_err());
        assert!(
            client
                .check_named(ModelAt::Json, &post, runs, None, &[], false)
                .is_ok(),
            "allowed unchecked"
        );
        let e = client
            .check_named(ModelAt::Json, &post, "/v1/assistants", None, &[], false)
            .unwrap_err();
        assert_eq!(e.code(), "model_not_allowed");
        assert!(
            e.to_string().contains("POST /v1/assistants names no model"),
            "{e}"
        );
        assert!(client
            .check_named(
                ModelAt::JsonIfPresent,
                &post,
                "/v1/assistants/a",
                None,
                &[],
                false
            )
            .is_ok());
        assert!(client
            .check_named(
                ModelAt::Json,
                &post,
                "/v1/responses",
                Some("gpt-4o"),
                &["o1".into()],
                false
            )
            .is_err());
        // A client secret's model is its session's: the body's own `model` names nothing.
        let secrets = "/v1/realtime/client_secrets";
        let e = client
            .check_named(ModelAt::Session, &post, secrets, Some("gpt-4o"), &[], false)
            .unwrap_err();
        assert!(e.to_string().contains("('session.model')"), "{e}");
        assert!(client
            .check_named(
                ModelAt::Session,
                &post,
                secrets,
                None,
                &["gpt-4o".into()],
                true
            )
            .is_ok());
        assert!(client
            .check_named(
                ModelAt::Session,
                &post,
                secrets,
                Some("gpt-4o"),
                &["o1".into()],
                true
            )
            .is_err());
    }

    #[test]
    fn globs() {
        let glob_match = |p: &str, t: &str| WildMatch::new(p).matches(t);
        assert!(glob_match("gpt-4o*", "gpt-4o"));
        assert!(glob_match("*-embedding-?", "text-embedding-3"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn alternating_keys_are_each_identified_by_their_own_digest() {
        let c = clients();
        // The per-thread memory of the last key must never answer for a different key,
        // including one that shares its length or its prefix.
        for _ in 0..3 {
            assert_eq!(
                c.identify(&auth("Bearer key-a")).unwrap().label(),
                Some("team-a")
            );
            for other in ["key-b", "key-a2", "key-", "kez-a"] {
                assert!(matches!(
                    c.identify(&auth(&format!("Bearer {other}"))),
                    Err(GatewayError::InvalidApiKey)
                ));
            }
        }
        let open = Clients::default();
        let fp = |k: &str| {
            open.identify(&auth(&format!("Bearer {k}")))
                .unwrap()
                .key_fingerprint
                .unwrap()
        };
        let (a, b) = (fp("sk-one"), fp("sk-two"));
        assert_ne!(a, b);
        assert_eq!(fp("sk-one"), a);
        assert_eq!(*a, *fingerprint(&sha256(b"sk-one")));
        assert_eq!(fp("sk-two"), b);
    }

    #[test]
    fn fingerprint_is_short_and_not_the_key() {
        let fp = fingerprint(&sha256(b"sk-secret"));
        assert!(fp.starts_with("fp:") && fp.len() == 15 && !fp.contains("secret"));
    }
}
