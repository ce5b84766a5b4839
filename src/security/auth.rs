//! Bearer tokens and what each may do: the auth file (TOML, one `[[token]]`
//! per token: a name, the SHA-256 of its secret, and topic patterns per
//! operation), re-read on demand (SIGHUP) without touching a connection;
//! [`Auth::authenticate`] turns a presented secret into a [`Principal`], and
//! [`Principal::allow`] decides each request.
//!
//! Secrets are 32 random bytes (hex, with a `spool_` prefix); the file keeps
//! only their SHA-256, and a presented secret is compared against every
//! stored hash in constant time. With no auth file, [`Auth::off`], every
//! caller is the unrestricted principal.
//!
//! A principal names its token and the hash it authenticated with, and
//! looks its permissions up at each check: a reload that narrows a token's
//! permissions applies to connections already open, and one that removes or
//! rotates a token makes its connections' next request `UNAUTHENTICATED`
//! (the native listener then closes the connection).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// What a secret starts with (so one found in a log or a file is recognised).
pub const SECRET_PREFIX: &str = "spool_";
/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;
/// How a hash is written in the auth file: `sha256:` and 64 hex digits.
const HASH_PREFIX: &str = "sha256:";

/// The operations a token is granted, each on a list of topic patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Appending messages.
    Produce,
    /// Reading: fetch, subscribe, ack, nack, commit, seek.
    Consume,
    /// Topic and group admin, deleting messages, compaction.
    Admin,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 3] = [Operation::Produce, Operation::Consume, Operation::Admin];

    /// The operation's name in the auth file and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Admin => "admin",
        }
    }

    /// How a refusal reads: "produce to", "consume from", "administer".
    fn verb(self) -> &'static str {
        match self {
            Operation::Produce => "produce to",
            Operation::Consume => "consume from",
            Operation::Admin => "administer",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one request needs of its caller's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Nothing beyond being authenticated (ping, ending one's own
    /// subscription).
    Open,
    /// The operation on the named topic.
    Topic(Operation, &'a str),
    /// Any operation on the named topic: seeing it (describing it).
    See(&'a str),
    /// The operation on every topic (compacting all of them): a `*` pattern.
    Every(Operation),
    /// Nothing up front; the answer holds only what the caller may see
    /// (listing topics), through [`Principal::may_see`].
    Filtered,
}

/// A topic pattern: an exact name, or a prefix followed by `*` (`*` alone
/// matches every topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Parses a pattern: topic-name characters (`[A-Za-z0-9._-]`), with one
    /// optional `*` at the end.
    pub fn parse(s: &str) -> Result<Pattern> {
        let body = s.strip_suffix('*').unwrap_or(s);
        let valid = body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid || (body.is_empty() && !s.ends_with('*')) || body.len() > 200 {
            return Err(Error::InvalidArgument(format!(
                "topic pattern {s:?}: expected a topic name ([A-Za-z0-9._-]) or a prefix followed by *"
            )));
        }
        Ok(Pattern(s.to_owned()))
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => self.0 == topic,
        }
    }

    /// Whether it matches every topic (`*`).
    fn is_all(&self) -> bool {
        self.0 == "*"
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One `[[token]]` of the auth file, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds it (named in logs and refusals).
    pub name: String,
    /// `sha256:` and the hex SHA-256 of the secret.
    pub hash: String,
    /// Topics it may produce to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub produce: Vec<String>,
    /// Topics it may consume from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consume: Vec<String>,
    /// Topics it may administer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin: Vec<String>,
}

impl TokenEntry {
    /// The entry as the TOML lines to add to an auth file.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct File<'a> {
            token: [&'a TokenEntry; 1],
        }
        toml::to_string(&File { token: [self] })
            .unwrap_or_else(|e| format!("# cannot write the entry as TOML: {e}\n"))
    }
}

/// The auth file's layout.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// A token as checked: its hash and its patterns per operation.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    hash: [u8; 32],
    grants: [Vec<Pattern>; 3],
}

impl Token {
    fn patterns(&self, op: Operation) -> &[Pattern] {
        &self.grants[op as usize]
    }
}

/// The tokens of one reading of the auth file.
#[derive(Debug, Default)]
struct Tokens(Vec<Token>);

impl Tokens {
    fn parse(text: &str, path: &Path) -> Result<Tokens> {
        let bad =
            |what: String| Error::InvalidArgument(format!("auth file {}: {what}", path.display()));
        let file: AuthFile =
            toml::from_str(text).map_err(|e| bad(crate::broker::config::toml_error(text, &e)))?;
        let mut names = HashSet::new();
        let mut tokens = Vec::with_capacity(file.token.len());
        for entry in file.token {
            if entry.name.is_empty() {
                return Err(bad("a token has an empty name".into()));
            }
            if !names.insert(entry.name.clone()) {
                return Err(bad(format!("token {} appears twice", entry.name)));
            }
            let hash = parse_hash(&entry.hash)
                .ok_or_else(|| bad(format!("token {}: hash must be sha256: followed by 64 hex digits (`spool token create` prints one)", entry.name)))?;
            // One secret must name one token: which permissions it carries
            // may not depend on the order of the file.
            if let Some(other) = tokens.iter().find(|t: &&Token| t.hash == hash) {
                return Err(bad(format!(
                    "tokens {} and {} have the same hash: each token needs a secret of its own",
                    other.name, entry.name
                )));
            }
            let patterns = |list: &[String]| {
                list.iter()
                    .map(|p| {
                        Pattern::parse(p).map_err(|e| bad(format!("token {}: {e}", entry.name)))
                    })
                    .collect::<Result<Vec<_>>>()
            };
            tokens.push(Token {
                grants: [
                    patterns(&entry.produce)?,
                    patterns(&entry.consume)?,
                    patterns(&entry.admin)?,
                ],
                name: entry.name,
                hash,
            });
        }
        Ok(Tokens(tokens))
    }

    /// The token whose hash is `hash`, comparing with every one in constant
    /// time (no early exit on a match or a mismatching byte).
    fn find(&self, hash: &[u8; 32]) -> Option<&Token> {
        let mut found = None;
        for token in &self.0 {
            if bool::from(token.hash.ct_eq(hash)) {
                found = Some(token);
            }
        }
        found
    }

    fn by_name(&self, name: &str) -> Option<&Token> {
        self.0.iter().find(|t| t.name == name)
    }
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix(HASH_PREFIX)?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The auth file's hash of `secret` (`sha256:` and 64 hex digits).
pub fn hash_secret(secret: &str) -> String {
    format!("{HASH_PREFIX}{}", to_hex(&digest(secret)))
}

/// A new secret (`spool_` and 64 hex digits from the system's random source).
pub fn new_secret() -> Result<String> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("reading the system's random source: {e}")))?;
    Ok(format!("{SECRET_PREFIX}{}", to_hex(&bytes)))
}

/// The tokens a broker accepts, shared by every listener and reloadable.
/// Cloning shares them.
#[derive(Clone, Default)]
pub struct Auth {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Auth(off)"),
            Some(inner) => write!(f, "Auth({})", inner.path.display()),
        }
    }
}

impl Auth {
    /// No authentication: every caller may do everything.
    pub fn off() -> Auth {
        Auth { inner: None }
    }

    /// Reads the auth file at `path`.
    pub fn load(path: &Path) -> Result<Auth> {
        let tokens = read(path)?;
        match tokens.0.len() {
            0 => tracing::warn!(file = %path.display(),
                "the auth file holds no token: every client is refused until one is added (then SIGHUP)"),
            n => tracing::info!(file = %path.display(), tokens = n, "auth file loaded"),
        }
        Ok(Auth {
            inner: Some(Arc::new(Inner {
                path: path.to_owned(),
                tokens: RwLock::new(Arc::new(tokens)),
            })),
        })
    }

    /// Whether callers must present a token.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Re-reads the auth file; on an error the tokens in force stay. Returns
    /// how many tokens are now in force.
    pub fn reload(&self) -> Result<usize> {
        let Some(inner) = &self.inner else {
            return Ok(0);
        };
        let tokens = read(&inner.path)?;
        let n = tokens.0.len();
        *inner.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
        Ok(n)
    }

    /// Re-reads the auth file (if there is one) and logs the outcome: the
    /// SIGHUP reload's share (see [`crate::security::Security::reload_on_sighup`]).
    pub fn reload_and_log(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        match self.reload() {
            Ok(0) => tracing::warn!(file = %inner.path.display(),
                "auth file reloaded; it holds no token: every client is refused until one is added (then SIGHUP)"),
            Ok(n) => tracing::info!(file = %inner.path.display(), tokens = n, "auth file reloaded"),
            Err(e) => {
                tracing::warn!(error = %e, "auth file not reloaded; the tokens in force stay")
            }
        }
    }

    fn tokens(&self) -> Option<Arc<Tokens>> {
        self.inner
            .as_ref()
            .map(|i| Arc::clone(&i.tokens.read().unwrap_or_else(|p| p.into_inner())))
    }

    /// The principal `token` (a secret) stands for: with auth off, the
    /// unrestricted one whatever the token; otherwise `UNAUTHENTICATED`
    /// when it is missing or unknown. A missing token's error says how the
    /// command line passes one; [`Auth::authenticate_as`] names another way.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal> {
        self.authenticate_as(token, "--token or SPOOL_TOKEN")
    }

    /// [`Auth::authenticate`] for a listener whose clients pass a token
    /// the way `how` says, which the error for a missing one names.
    pub fn authenticate_as(&self, token: Option<&str>, how: &str) -> Result<Principal> {
        let Some(tokens) = self.tokens() else {
            return Ok(Principal { who: Who::Anyone });
        };
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            Error::Unauthenticated(format!("this broker requires a token: {how}"))
        })?;
        let hash = digest(token);
        match tokens.find(&hash) {
            Some(t) => Ok(Principal {
                who: Who::Token {
                    name: t.name.clone(),
                    hash,
                    auth: self.clone(),
                },
            }),
            None => Err(Error::Unauthenticated("the token is not valid".into())),
        }
    }

    /// Like [`Auth::authenticate`], from an HTTP `authorization` header
    /// value (`Bearer SECRET`).
    pub fn authenticate_bearer(&self, header: Option<&str>) -> Result<Principal> {
        const HOW: &str = "send the metadata `authorization: Bearer TOKEN`";
        if !self.enabled() {
            return self.authenticate_as(None, HOW);
        }
        match header {
            None => self.authenticate_as(None, HOW),
            // HTTP's reading (RFC 9110 section 11): the scheme in any case,
            // the credentials after the spaces that follow it, and no
            // space at either end of a field value.
            Some(h) => match h.trim().split_once(' ') {
                Some((scheme, secret)) if scheme.eq_ignore_ascii_case("bearer") => {
                    self.authenticate_as(Some(secret.trim_start_matches(' ')), HOW)
                }
                _ => Err(Error::Unauthenticated(
                    "the authorization header must be `Bearer TOKEN`".into(),
                )),
            },
        }
    }
}

fn read(path: &Path) -> Result<Tokens> {
    let text = crate::storage::io::read_settings_text(path)
        .map_err(|e| Error::io(format!("reading auth file {}", path.display()), e))?;
    Tokens::parse(&text, path)
}

/// Who a caller is: everyone (no auth), or the holder of a token.
#[derive(Clone, Debug)]
pub struct Principal {
    who: Who,
}

#[derive(Clone)]
enum Who {
    Anyone,
    Token {
        name: String,
        hash: [u8; 32],
        auth: Auth,
    },
}

impl fmt::Debug for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Anyone => f.write_str("Anyone"),
            Who::Token { name, .. } => write!(f, "Token({name})"),
        }
    }
}

impl Principal {
    /// The principal of a broker without auth: allowed everything.
    pub fn anyone() -> Principal {
        Principal { who: Who::Anyone }
    }

    /// The token's name, or `None` without auth.
    pub fn name(&self) -> Option<&str> {
        match &self.who {
            Who::Anyone => None,
            Who::Token { name, .. } => Some(name),
        }
    }

    /// Runs `f` on the token as the auth file now has it: `UNAUTHENTICATED`
    /// once a reload removed or rotated it.
    fn with_token<T>(&self, f: impl FnOnce(&Token) -> T) -> Result<Option<T>> {
        let Who::Token { name, hash, auth } = &self.who else {
            return Ok(None);
        };
        let tokens = auth.tokens().unwrap_or_default();
        match tokens.by_name(name) {
            Some(t) if bool::from(t.hash.ct_eq(hash)) => Ok(Some(f(t))),
            _ => Err(Error::Unauthenticated(format!(
                "token {name} was removed or replaced; connect again with a valid token"
            ))),
        }
    }

    /// Whether this caller may do what `access` names: `PERMISSION_DENIED`
    /// naming the token, the operation and the topic if not.
    pub fn allow(&self, access: Access<'_>) -> Result<()> {
        let allowed = self.with_token(|t| match access {
            Access::Open | Access::Filtered => true,
            Access::Topic(op, topic) => t.patterns(op).iter().any(|p| p.matches(topic)),
            Access::See(topic) => Operation::ALL
                .iter()
                .any(|&op| t.patterns(op).iter().any(|p| p.matches(topic))),
            Access::Every(op) => t.patterns(op).iter().any(Pattern::is_all),
        })?;
        if allowed.unwrap_or(true) {
            return Ok(());
        }
        let name = self.name().unwrap_or_default();
        Err(Error::PermissionDenied(match access {
            Access::Topic(op, topic) => format!("token {name} may not {} topic {topic}", op.verb()),
            Access::See(topic) => format!("token {name} has no permission on topic {topic}"),
            Access::Every(op) => format!(
                "token {name} may not {} every topic (it needs {op} on *)",
                op.verb()
            ),
            Access::Open | Access::Filtered => format!("token {name} may not do this"),
        }))
    }

    /// Whether this caller has any permission on `topic` (what listing
    /// topics shows it).
    pub fn may_see(&self, topic: &str) -> bool {
        self.allow(Access::See(topic)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_with(text: &str) -> Auth {
        Auth {
            inner: Some(Arc::new(Inner {
                path: PathBuf::from("auth.toml"),
                tokens: RwLock::new(Arc::new(
                    Tokens::parse(text, Path::new("auth.toml")).expect("a valid auth file"),
                )),
            })),
        }
    }

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        let exact = Pattern::parse("orders").expect("exact");
        assert!(exact.matches("orders"));
        assert!(!exact.matches("orders2"));
        let prefix = Pattern::parse("orders.*").expect("prefix");
        assert!(prefix.matches("orders.eu"));
        assert!(!prefix.matches("orders"));
        assert!(Pattern::parse("*").expect("all").matches("anything"));
        for bad in ["", "a*b", "a b", "**", "a/b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_token_is_found_by_its_secret_and_held_to_its_patterns() {
        let secret = new_secret().expect("random");
        let entry = TokenEntry {
            name: "writer".into(),
            hash: hash_secret(&secret),
            produce: vec!["orders.*".into()],
            consume: vec!["orders.eu".into()],
            admin: vec![],
        };
        let auth = auth_with(&entry.to_toml());
        assert!(auth.authenticate(None).is_err());
        assert!(auth.authenticate(Some("spool_wrong")).is_err());
        let p = auth.authenticate(Some(&secret)).expect("valid");
        assert_eq!(p.name(), Some("writer"));
        p.allow(Access::Topic(Operation::Produce, "orders.us"))
            .expect("produce");
        p.allow(Access::Topic(Operation::Consume, "orders.eu"))
            .expect("consume");
        let e = p
            .allow(Access::Topic(Operation::Consume, "orders.us"))
            .expect_err("not granted");
        assert_eq!(
            e.to_string(),
            "token writer may not consume from topic orders.us"
        );
        assert!(matches!(e, Error::PermissionDenied(_)));
        assert!(p.may_see("orders.us"));
        assert!(!p.may_see("payments"));
        assert!(p.allow(Access::Every(Operation::Admin)).is_err());
        assert!(p.allow(Access::Open).is_ok());
    }

    #[test]
    fn without_auth_everyone_may_do_everything() {
        let p = Auth::off().authenticate(None).expect("anyone");
        p.allow(Access::Every(Operation::Admin)).expect("all");
        assert!(p.may_see("x"));
    }

    #[test]
    fn bad_auth_files_name_what_is_wrong() {
        for (text, want) in [
            (
                "[[token]]\nname = \"a\"\nhash = \"md5:00\"\n",
                "token a: hash must be",
            ),
            ("[[token]]\nname = \"\"\nhash = \"x\"\n", "empty name"),
            (
                "[[token]]\nname = \"a\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nproduce = [\"a b\"]\n",
                "topic pattern \"a b\"",
            ),
            (
                "[[token]]\nname = \"a\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nwrite = [\"a\"]\n",
                "unknown field",
            ),
            (
                "[[token]]\nname = \"a\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n\
                 [[token]]\nname = \"b\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n",
                "tokens a and b have the same hash",
            ),
        ] {
            let e = Tokens::parse(text, Path::new("auth.toml")).expect_err(text);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn a_bearer_header_needs_its_scheme() {
        let secret = new_secret().expect("random");
        let auth = auth_with(
            &TokenEntry {
                name: "a".into(),
                hash: hash_secret(&secret),
                ..TokenEntry::default()
            }
            .to_toml(),
        );
        // Read as HTTP reads it: the scheme in any case, spaces around
        // the secret not part of it.
        for header in [
            format!("Bearer {secret}"),
            format!("BEARER  {secret} "),
            format!("bearer {secret}"),
        ] {
            assert!(auth.authenticate_bearer(Some(&header)).is_ok(), "{header}");
        }
        for header in [
            secret.clone(),
            format!("Bearer{secret}"),
            format!("Basic {secret}"),
            format!("Bearer {secret}x"),
        ] {
            assert!(auth.authenticate_bearer(Some(&header)).is_err(), "{header}");
        }
        assert!(auth.authenticate_bearer(None).is_err());
    }
}
