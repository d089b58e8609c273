//! Names in the kit's requests. Test code writes names as strings, but the
//! wire types hold only valid ones (`UserName`, `SessionId`, `UaName`):
//! a string a test knows is valid becomes its newtype ([`user`],
//! [`session`], [`ua`]); a hostile test's invalid name (`../etc`) is put
//! in through [`Names`], which builds the request with valid stand-ins and
//! swaps their encoded bytes for the raw names before the request is sent
//! ([`send`]). postcard encodes a name as its length and bytes, so the swap
//! yields exactly the frame a peer without the types would send.

use uve_protocol::link::{LinkError, LinkHandle};
use uve_protocol::message::{Request, Response};
use uve_protocol::names::{NameError, SessionId, UaName, UserName};

fn checked<T>(kind: &str, s: &str, make: impl FnOnce(&str) -> Result<T, NameError>) -> T {
    match make(s) {
        Ok(n) => n,
        Err(e) => {
            panic!("the test's {kind} {s:?} is not a valid name ({e}); use kit::names::Names")
        }
    }
}

/// `s` as any name newtype (or a `String`), for test code with names it
/// knows are valid; panics (the test is wrong) if it is invalid.
pub fn valid<T>(s: &str) -> T
where
    T: TryFrom<String>,
    T::Error: std::fmt::Display,
{
    match T::try_from(s.to_string()) {
        Ok(n) => n,
        Err(e) => panic!("the test's name {s:?} is not valid ({e}); use kit::names::Names"),
    }
}

/// `s` as a user name; panics (the test is wrong) if it is invalid.
pub fn user(s: &str) -> UserName {
    checked("user", s, |s| UserName::new(s))
}

/// `s` as a session id; panics (the test is wrong) if it is invalid.
pub fn session(s: &str) -> SessionId {
    checked("session", s, |s| SessionId::new(s))
}

/// `s` as a UA name; panics (the test is wrong) if it is invalid.
pub fn ua(s: &str) -> UaName {
    checked("UA", s, |s| UaName::new(s))
}

/// The raw names of one request being built: each name is its newtype if
/// valid, else a stand-in recorded for [`Names::encode`] to swap.
#[derive(Debug, Default)]
pub struct Names {
    swaps: Vec<(String, String)>,
}

impl Names {
    fn stand_in<T>(&mut self, raw: &str, make: impl Fn(String) -> Result<T, NameError>) -> T {
        if let Ok(n) = make(raw.to_string()) {
            return n;
        }
        let stand_in = format!("uve-kit-stand-in-{:04}", self.swaps.len());
        self.swaps.push((stand_in.clone(), raw.to_string()));
        match make(stand_in) {
            Ok(n) => n,
            Err(e) => panic!("stand-in name refused: {e}"),
        }
    }

    /// `raw` as a user name, valid or not.
    pub fn user(&mut self, raw: &str) -> UserName {
        self.stand_in(raw, UserName::new)
    }

    /// `raw` as a session id, valid or not.
    pub fn session(&mut self, raw: &str) -> SessionId {
        self.stand_in(raw, SessionId::new)
    }

    /// `raw` as a UA name, valid or not.
    pub fn ua(&mut self, raw: &str) -> UaName {
        self.stand_in(raw, UaName::new)
    }

    /// Whether every name was valid (the request can go as it is).
    pub fn all_valid(&self) -> bool {
        self.swaps.is_empty()
    }

    /// `req`'s postcard encoding with every stand-in replaced by its raw
    /// name.
    pub fn encode(&self, req: &Request) -> Vec<u8> {
        let mut bytes = encoded(req);
        for (stand_in, raw) in &self.swaps {
            let (from, to) = (encoded(stand_in), encoded(raw));
            let at = bytes.windows(from.len()).position(|w| w == from.as_slice());
            match at {
                Some(i) => {
                    bytes.splice(i..i + from.len(), to);
                }
                None => panic!("stand-in {stand_in} not found in the encoded request"),
            }
        }
        bytes
    }
}

fn encoded<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
    match postcard::to_allocvec(v) {
        Ok(b) => b,
        Err(e) => panic!("encode: {e}"),
    }
}

/// Builds a request with `build` (whose names may be invalid) and sends it
/// on `link`: typed when every name is valid, else raw.
pub async fn send(
    link: &LinkHandle,
    build: impl FnOnce(&mut Names) -> Request,
) -> Result<Response, LinkError> {
    let mut names = Names::default();
    let req = build(&mut names);
    if names.all_valid() {
        link.request(req).await
    } else {
        link.request_encoded(&names.encode(&req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapped_names_decode_as_the_raw_strings() {
        let mut n = Names::default();
        let req = Request::UifRetrieve {
            user: n.user("../etc"),
            session: n.session("s1"),
        };
        let bytes = n.encode(&req);
        // What a peer without the types would have sent.
        #[derive(serde::Serialize)]
        enum Raw {
            UifRetrieve { user: String, session: String },
        }
        let raw = Raw::UifRetrieve {
            user: "../etc".into(),
            session: "s1".into(),
        };
        assert_eq!(bytes, encoded(&raw));
        assert!(postcard::from_bytes::<Request>(&bytes).is_err());
    }
}
