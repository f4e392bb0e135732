//! Probe specifications as users write them on the command line:
//! `SYMBOL`, `LIBRARY:SYMBOL`, `SYMBOL+OFFSET`, `0xADDRESS` (a file offset)
//! and `usdt:PROVIDER:NAME`.
use std::fmt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProbeSpecError {
    #[error("empty probe: give a function name such as `handle_request`")]
    Empty,
    #[error(
        "`{spec}`: a USDT probe is written `usdt:PROVIDER:NAME` (e.g. `usdt:postgresql:query__start`)"
    )]
    BadUsdt { spec: String },
    #[error(
        "`{spec}`: `{offset}` is not an offset; write `SYMBOL+OFFSET` with a decimal or 0x-hex offset"
    )]
    BadOffset { spec: String, offset: String },
    #[error("`{spec}`: `{address}` is not a hexadecimal file offset")]
    BadAddress { spec: String, address: String },
    #[error(
        "`{spec}`: the {part} is empty; write `FUNCTION`, `LIBRARY:FUNCTION` or `FUNCTION+OFFSET`"
    )]
    EmptyPart { spec: String, part: &'static str },
}

/// Where in an object file a probe goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeLocation {
    /// A function symbol plus a byte offset into it.
    Symbol { name: String, offset: u64 },
    /// A file offset in the object.
    FileOffset(u64),
    /// A USDT probe from the object's `.note.stapsdt`.
    Usdt { provider: String, name: String },
}

/// A parsed probe specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The library the probe is in (`libc.so.6`, `libc`, or a path); `None`
    /// means the target's executable.
    pub library: Option<String>,
    pub location: ProbeLocation,
    /// The text as the user gave it (reports echo it in `entry`).
    pub text: String,
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ProbeSpec {
    type Err = ProbeSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ProbeSpecError::Empty);
        }
        if let Some(rest) = text.strip_prefix("usdt:") {
            // PROVIDER:NAME, or LIBRARY:PROVIDER:NAME: providers may begin
            // with `lib` (`libstdcxx`), so the count of parts decides.
            let parts: Vec<&str> = rest.split(':').collect();
            let (library, provider, name) = match parts.as_slice() {
                [provider, name] => (None, *provider, *name),
                [library, provider, name] if !library.is_empty() => {
                    (Some((*library).to_owned()), *provider, *name)
                }
                _ => return Err(ProbeSpecError::BadUsdt { spec: text.into() }),
            };
            if provider.is_empty() || name.is_empty() {
                return Err(ProbeSpecError::BadUsdt { spec: text.into() });
            }
            return Ok(Self {
                library,
                location: ProbeLocation::Usdt {
                    provider: provider.into(),
                    name: name.into(),
                },
                text: text.into(),
            });
        }
        if text.starts_with(':') && !text.starts_with("::") {
            return Err(ProbeSpecError::EmptyPart {
                spec: text.into(),
                part: "library before `:`",
            });
        }
        let (library, rest) = split_library(text);
        if rest.is_empty() {
            return Err(ProbeSpecError::EmptyPart {
                spec: text.into(),
                part: "function after `:`",
            });
        }
        let location = if let Some(hex) = rest.strip_prefix("0x") {
            let address = u64::from_str_radix(hex, 16).map_err(|_| ProbeSpecError::BadAddress {
                spec: text.into(),
                address: rest.into(),
            })?;
            ProbeLocation::FileOffset(address)
        } else if let Some((name, offset)) = rest.rsplit_once('+') {
            let parsed = match offset.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => offset.parse(),
            };
            let offset = parsed.map_err(|_| ProbeSpecError::BadOffset {
                spec: text.into(),
                offset: offset.into(),
            })?;
            if name.is_empty() {
                return Err(ProbeSpecError::EmptyPart {
                    spec: text.into(),
                    part: "function before `+`",
                });
            }
            ProbeLocation::Symbol {
                name: name.into(),
                offset,
            }
        } else {
            ProbeLocation::Symbol {
                name: rest.into(),
                offset: 0,
            }
        };
        Ok(Self {
            library,
            location,
            text: text.into(),
        })
    }
}

/// Splits `LIBRARY:REST` when the part before the first single ':' names a
/// library (a path, or a name starting `lib` or holding `.so`). C++ names
/// with `::` stay whole.
fn split_library(text: &str) -> (Option<String>, &str) {
    let Some(colon) = text.find(':') else {
        return (None, text);
    };
    let (head, tail) = (&text[..colon], &text[colon + 1..]);
    if tail.starts_with(':') || head.is_empty() {
        return (None, text);
    }
    let looks_like_library =
        head.starts_with('/') || head.starts_with("lib") || head.contains(".so");
    if looks_like_library {
        (Some(head.to_owned()), tail)
    } else {
        (None, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ProbeSpec {
        text.parse().unwrap()
    }

    #[test]
    fn plain_symbol() {
        let spec = parse("handle_request");
        assert_eq!(spec.library, None);
        assert_eq!(
            spec.location,
            ProbeLocation::Symbol {
                name: "handle_request".into(),
                offset: 0
            }
        );
        assert_eq!(spec.to_string(), "handle_request");
    }

    #[test]
    fn library_symbol() {
        let spec = parse("libc.so.6:recv");
        assert_eq!(spec.library.as_deref(), Some("libc.so.6"));
        assert_eq!(
            spec.location,
            ProbeLocation::Symbol {
                name: "recv".into(),
                offset: 0
            }
        );
        assert_eq!(
            parse("/usr/lib/libfoo.so:f").library.as_deref(),
            Some("/usr/lib/libfoo.so")
        );
    }

    #[test]
    fn cxx_names_are_not_libraries() {
        let spec = parse("ns::Server::handle");
        assert_eq!(spec.library, None);
        assert_eq!(
            spec.location,
            ProbeLocation::Symbol {
                name: "ns::Server::handle".into(),
                offset: 0
            }
        );
    }

    #[test]
    fn offsets_and_addresses() {
        assert_eq!(
            parse("f+0x10").location,
            ProbeLocation::Symbol {
                name: "f".into(),
                offset: 16
            }
        );
        assert_eq!(
            parse("f+8").location,
            ProbeLocation::Symbol {
                name: "f".into(),
                offset: 8
            }
        );
        assert_eq!(parse("0x1139").location, ProbeLocation::FileOffset(0x1139));
        assert!(matches!(
            "f+zz".parse::<ProbeSpec>(),
            Err(ProbeSpecError::BadOffset { .. })
        ));
        assert!(matches!(
            "0xzz".parse::<ProbeSpec>(),
            Err(ProbeSpecError::BadAddress { .. })
        ));
    }

    #[test]
    fn usdt() {
        let spec = parse("usdt:postgresql:query__start");
        assert_eq!(
            spec.location,
            ProbeLocation::Usdt {
                provider: "postgresql".into(),
                name: "query__start".into()
            }
        );
        for bad in [
            "usdt:postgresql",
            "usdt:",
            "usdt:a:b:c:d",
            "usdt::b:c",
            "usdt:a:",
        ] {
            assert!(
                matches!(
                    bad.parse::<ProbeSpec>(),
                    Err(ProbeSpecError::BadUsdt { .. })
                ),
                "{bad}"
            );
        }
        // A provider may begin with `lib`: two parts are PROVIDER:NAME.
        let spec = parse("usdt:libstdcxx:throw");
        assert_eq!(spec.library, None);
        assert_eq!(
            spec.location,
            ProbeLocation::Usdt {
                provider: "libstdcxx".into(),
                name: "throw".into()
            }
        );
        let spec = parse("usdt:libstdc++.so.6:libstdcxx:throw");
        assert_eq!(spec.library.as_deref(), Some("libstdc++.so.6"));
    }

    #[test]
    fn empty() {
        assert_eq!("".parse::<ProbeSpec>(), Err(ProbeSpecError::Empty));
        for bad in ["libc.so.6:", ":fn", "+5"] {
            let err = bad.parse::<ProbeSpec>().unwrap_err();
            assert!(
                matches!(err, ProbeSpecError::EmptyPart { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("is empty"), "{err}");
        }
    }
}
