//! The bearer token of `[admin] token_file`, and who may see what.
//!
//! `/stats`, `/report` and `/report.html` show parts of captured requests (paths, header values
//! the comparison did not redact, body snippets); with a token they answer only requests that
//! carry it as `Authorization: Bearer TOKEN`. The probes and `/metrics` stay open: a kubelet or
//! a Prometheus has no token to send, and they show only counts. The configuration requires a
//! token wherever the endpoint listens beyond loopback.
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Page;

/// A token shorter than this could be guessed by asking the endpoint often enough.
pub const MIN_TOKEN_LEN: usize = 16;
/// A token file larger than this is not a token.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A bearer token, read once at start (the agent) or per command (`status`, `report`). Only
/// its digest is compared, so the comparison takes the same time wherever a wrong token
/// differs, and learns nothing of the token from the time it takes.
#[derive(Clone)]
pub struct AdminToken {
    value: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the admin token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the admin token file {path} can be read by every user (mode {mode:04o}): make it \
         readable by the agent only (`chmod 600`; on Kubernetes a Secret volume with \
         `defaultMode: 0400` and the pod's `fsGroup`)"
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error("the admin token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the admin token file {path}: {problem}")]
    Invalid {
        path: PathBuf,
        problem: TokenProblem,
    },
}

/// What is wrong with a token's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("it is empty")]
    Empty,
    #[error(
        "the token has {0} characters, fewer than {MIN_TOKEN_LEN}: make a longer one, e.g. \
         with `openssl rand -hex 32`"
    )]
    TooShort(usize),
    #[error(
        "a bearer token is one word of letters, digits and `-._~+/`, ending in any number of \
         `=` (RFC 6750), e.g. from `openssl rand -hex 32`"
    )]
    NotAToken,
}

impl AdminToken {
    /// The token in `text`, without the surrounding white space (such as the newline `echo`
    /// and `openssl rand -hex` end with).
    ///
    /// # Errors
    /// When it is empty, shorter than [`MIN_TOKEN_LEN`] or not an RFC 6750 `b64token`.
    pub fn parse(text: &str) -> Result<Self, TokenProblem> {
        let value = text.trim_ascii();
        if value.is_empty() {
            return Err(TokenProblem::Empty);
        }
        let body = value.trim_end_matches('=');
        let word = |c: char| c.is_ascii_alphanumeric() || "-._~+/".contains(c);
        if body.is_empty() || !body.chars().all(word) {
            return Err(TokenProblem::NotAToken);
        }
        if value.len() < MIN_TOKEN_LEN {
            return Err(TokenProblem::TooShort(value.len()));
        }
        Ok(Self {
            value: value.to_owned(),
            digest: Sha256::digest(value.as_bytes()).into(),
        })
    }

    /// Reads the token from `path`, which other users may not access (its mode has no bits
    /// for "others"; the owner and group are the operator's choice).
    ///
    /// # Errors
    /// When the file cannot be read, is accessible to every user, larger than 4 KiB, or holds
    /// no valid token (see [`AdminToken::parse`]).
    pub fn read(path: &Path) -> Result<Self, TokenError> {
        let read_err = |source| TokenError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        // The mode of the file opened, not of the path: nothing can swap it in between.
        let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(TokenError::Readable {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(MAX_TOKEN_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(TokenError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&text).map_err(|problem| TokenError::Invalid {
            path: path.to_owned(),
            problem,
        })
    }

    /// The `Authorization` header value that carries this token.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.value)
    }

    /// Whether `presented` is this token. The digests are compared without an early exit; a
    /// difference found early or late in the token takes the same time.
    pub fn admits(&self, presented: &[u8]) -> bool {
        let theirs: [u8; 32] = Sha256::digest(presented).into();
        let diff = self
            .digest
            .iter()
            .zip(theirs)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// Whether a request may see a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The page needs no token, or the endpoint has none.
    Open,
    /// The request carries the token.
    Granted,
    /// The page needs the token and the request carries no bearer token: 401.
    NoToken,
    /// The request carries a bearer token that is not the one: 401, `invalid_token`.
    WrongToken,
}

/// Who may see `page`, given the endpoint's `token` and the request's `Authorization` header.
pub fn access(page: Page, token: Option<&AdminToken>, authorization: Option<&[u8]>) -> Access {
    let Some(token) = token else {
        return Access::Open;
    };
    if !page.shows_captured_data() {
        return Access::Open;
    }
    match authorization.and_then(bearer) {
        None => Access::NoToken,
        Some(presented) if token.admits(presented) => Access::Granted,
        Some(_) => Access::WrongToken,
    }
}

/// The token of an `Authorization: Bearer TOKEN` header value (the scheme in any case, RFC
/// 7235); `None` for another scheme or no token.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    let token = rest.strip_prefix(b" ")?.trim_ascii_start();
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn token() -> AdminToken {
        AdminToken::parse(TOKEN).expect("valid")
    }

    #[test]
    fn probes_and_metrics_are_open_the_captured_data_needs_the_token() {
        let t = token();
        let right = format!("Bearer {TOKEN}");
        for page in [Page::Healthz, Page::Readyz, Page::Metrics, Page::Verdict] {
            assert_eq!(access(page, Some(&t), None), Access::Open);
            assert_eq!(access(page, Some(&t), Some(b"Bearer nope")), Access::Open);
        }
        for page in [Page::Stats, Page::Report, Page::ReportHtml] {
            assert_eq!(access(page, Some(&t), None), Access::NoToken);
            assert_eq!(
                access(page, Some(&t), Some(right.as_bytes())),
                Access::Granted
            );
            assert_eq!(
                access(page, Some(&t), Some(b"Bearer 0123456789abcdef")),
                Access::WrongToken
            );
            assert_eq!(access(page, None, None), Access::Open, "no token: loopback");
        }
    }

    #[test]
    fn only_a_bearer_header_carries_the_token() {
        let t = token();
        let granted = |h: &str| access(Page::Stats, Some(&t), Some(h.as_bytes()));
        assert_eq!(granted(&format!("bearer {TOKEN}")), Access::Granted);
        assert_eq!(granted(&format!("BEARER   {TOKEN} ")), Access::Granted);
        assert_eq!(granted(&format!("Basic {TOKEN}")), Access::NoToken);
        assert_eq!(granted(&format!("Bearer{TOKEN}")), Access::NoToken);
        assert_eq!(granted("Bearer "), Access::NoToken);
        assert_eq!(granted(TOKEN), Access::NoToken);
        assert_eq!(granted(&format!("Bearer {TOKEN}x")), Access::WrongToken);
        assert_eq!(
            granted(&format!("Bearer {TOKEN} {TOKEN}")),
            Access::WrongToken
        );
    }

    #[test]
    fn token_text_is_one_long_enough_word() {
        let t = AdminToken::parse(&format!("  {TOKEN}\n")).expect("trimmed");
        assert!(t.admits(TOKEN.as_bytes()));
        assert_eq!(t.authorization(), format!("Bearer {TOKEN}"));
        assert_eq!(format!("{t:?}"), "AdminToken(…)", "never printed");
        assert!(AdminToken::parse("abcDEF0123-._~+/==").is_ok());
        assert_eq!(AdminToken::parse(" \n").err(), Some(TokenProblem::Empty));
        assert_eq!(
            AdminToken::parse("short").err(),
            Some(TokenProblem::TooShort(5))
        );
        for bad in [
            "two words of token text",
            "0123456789abcdef\n0123456789abcdef",
            "====================",
            "0123456789abcdef=x",
            "0123456789abcdé0123456789",
        ] {
            assert_eq!(
                AdminToken::parse(bad).err(),
                Some(TokenProblem::NotAToken),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_token_file_must_exist_hold_a_token_and_be_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        assert!(matches!(
            AdminToken::read(&path),
            Err(TokenError::Read { .. })
        ));
        write(&format!("{TOKEN}\n"), 0o600);
        assert!(
            AdminToken::read(&path)
                .expect("valid")
                .admits(TOKEN.as_bytes())
        );
        write(&format!("{TOKEN}\n"), 0o440);
        assert!(AdminToken::read(&path).is_ok(), "a group may read it");
        write(&format!("{TOKEN}\n"), 0o644);
        let err = AdminToken::read(&path).expect_err("world-readable");
        assert!(err.to_string().contains("mode 0644"), "{err}");
        write("", 0o600);
        assert!(matches!(
            AdminToken::read(&path),
            Err(TokenError::Invalid {
                problem: TokenProblem::Empty,
                ..
            })
        ));
        write(&"a".repeat(5000), 0o600);
        assert!(matches!(
            AdminToken::read(&path),
            Err(TokenError::TooLarge { .. })
        ));
    }

    proptest! {
        /// Exactly the token is admitted: any other byte string, including every prefix and
        /// extension of it, is not.
        #[test]
        fn admits_exactly_the_token(
            token in "[A-Za-z0-9._~+/-]{16,64}",
            other in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let t = AdminToken::parse(&token).expect("a valid token");
            prop_assert!(t.admits(token.as_bytes()));
            prop_assert_eq!(t.admits(&other), other == token.as_bytes());
            prop_assert!(!t.admits(&token.as_bytes()[..token.len() - 1]));
            let mut longer = token.clone().into_bytes();
            longer.push(b'x');
            prop_assert!(!t.admits(&longer));
        }

        /// Any header value is decided without panicking, and only the right one is granted.
        #[test]
        fn any_header_is_decided(header in proptest::collection::vec(any::<u8>(), 0..80)) {
            let t = AdminToken::parse(TOKEN).expect("valid");
            let decision = access(Page::Stats, Some(&t), Some(&header));
            prop_assert_ne!(decision, Access::Open);
            if decision == Access::Granted {
                prop_assert_eq!(bearer(&header), Some(TOKEN.as_bytes()));
            }
        }
    }
}
