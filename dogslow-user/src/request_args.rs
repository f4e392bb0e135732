//! `--capture [NAME=]argN:TYPE`: which request arguments to record at entry,
//! where they live (SysV registers for functions, the argument spec for USDT
//! probes), and how they appear in reports as `"request": {NAME: value}`.
use std::{fmt, str::FromStr};

use dogslow_common::{
    CAPTURE_CONSTANT, CAPTURE_MEMORY, CAPTURE_REGISTER, CaptureSpec, MAX_CAPTURE_STR, MAX_CAPTURES,
    RequestArgs,
};
use serde_json::{Map, Value};
use thiserror::Error;

/// Default `--capture-len`.
pub const DEFAULT_CAPTURE_LEN: u32 = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CaptureError {
    #[error("`{spec}`: write a capture as [NAME=]argN:TYPE, e.g. query=arg0:str")]
    Syntax { spec: String },
    #[error("`{spec}`: unknown type `{found}`; use one of str, u64, i64, hex")]
    UnknownType { spec: String, found: String },
    #[error(
        "`{spec}`: arg{index} is passed on the stack under the x86-64 SysV ABI; dogslow captures the first six integer arguments (arg0..arg5)"
    )]
    StackArgument { spec: String, index: u32 },
    #[error(
        "`{spec}`: the probe has {count} argument(s) (arg0..arg{last}); there is no arg{index}"
    )]
    NoSuchArgument {
        spec: String,
        index: u32,
        count: usize,
        last: usize,
    },
    #[error("at most {MAX_CAPTURES} --capture per target")]
    TooMany,
    #[error("`{spec}`: two captures are named `{name}`")]
    DuplicateName { spec: String, name: String },
    #[error("`{spec}`: {reason}")]
    Unsupported { spec: String, reason: String },
}

/// How a captured value is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    /// A NUL-terminated string the argument points at.
    Str,
    U64,
    I64,
    /// The value as `"0x…"`.
    Hex,
}

/// One `--capture`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureRequest {
    pub name: String,
    pub arg: u32,
    pub value_type: ValueType,
    /// The text as given, for messages.
    pub text: String,
}

impl fmt::Display for CaptureRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for CaptureRequest {
    type Err = CaptureError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || CaptureError::Syntax { spec: text.into() };
        let (name, rest) = match text.split_once('=') {
            Some((name, rest)) => (Some(name.trim()), rest),
            None => (None, text),
        };
        let (arg, value_type) = rest.split_once(':').ok_or_else(syntax)?;
        let arg: u32 = arg
            .trim()
            .strip_prefix("arg")
            .and_then(|n| n.parse().ok())
            .ok_or_else(syntax)?;
        let value_type = match value_type.trim() {
            "str" => ValueType::Str,
            "u64" => ValueType::U64,
            "i64" => ValueType::I64,
            "hex" => ValueType::Hex,
            other => {
                return Err(CaptureError::UnknownType {
                    spec: text.into(),
                    found: other.into(),
                });
            }
        };
        let name = match name {
            Some("") => return Err(syntax()),
            Some(name)
                if !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                return Err(syntax());
            }
            Some(name) => name.to_owned(),
            None => format!("arg{arg}"),
        };
        Ok(Self {
            name,
            arg,
            value_type,
            text: text.into(),
        })
    }
}

/// Checks a target's captures together (count, names).
pub fn check_all(captures: &[CaptureRequest]) -> Result<(), CaptureError> {
    if captures.len() > MAX_CAPTURES {
        return Err(CaptureError::TooMany);
    }
    for (i, capture) in captures.iter().enumerate() {
        if captures[..i]
            .iter()
            .any(|earlier| earlier.name == capture.name)
        {
            return Err(CaptureError::DuplicateName {
                spec: capture.text.clone(),
                name: capture.name.clone(),
            });
        }
    }
    Ok(())
}

/// `struct pt_regs` index of each SysV integer argument register
/// (rdi, rsi, rdx, rcx, r8, r9).
const SYSV_ARGUMENT_REGISTERS: [u32; 6] = [14, 13, 12, 11, 9, 8];

/// Where a function's argument is at its entry, under the x86-64 SysV ABI.
pub fn function_argument(
    capture: &CaptureRequest,
    capture_len: u32,
) -> Result<CaptureSpec, CaptureError> {
    let register =
        *SYSV_ARGUMENT_REGISTERS
            .get(capture.arg as usize)
            .ok_or(CaptureError::StackArgument {
                spec: capture.text.clone(),
                index: capture.arg,
            })?;
    Ok(with_type(
        CaptureSpec {
            location: CAPTURE_REGISTER,
            register,
            size: 8,
            ..Default::default()
        },
        capture,
        capture_len,
    ))
}

/// A located argument as the probe sees it (a USDT argument spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgumentLocation {
    /// In a register (`struct pt_regs` index).
    Register { register: u32 },
    /// In memory at register + displacement.
    Memory { register: u32, displacement: i64 },
    /// A constant.
    Constant(i64),
}

/// Where a USDT probe's argument is, given its decoded location and size
/// (negative size: signed).
pub fn probe_argument(
    capture: &CaptureRequest,
    location: ArgumentLocation,
    size: i32,
    capture_len: u32,
) -> CaptureSpec {
    let base = match location {
        ArgumentLocation::Register { register } => CaptureSpec {
            location: CAPTURE_REGISTER,
            register,
            ..Default::default()
        },
        ArgumentLocation::Memory {
            register,
            displacement,
        } => CaptureSpec {
            location: CAPTURE_MEMORY,
            register,
            offset: displacement,
            ..Default::default()
        },
        ArgumentLocation::Constant(value) => CaptureSpec {
            location: CAPTURE_CONSTANT,
            offset: value,
            ..Default::default()
        },
    };
    with_type(
        CaptureSpec {
            size: size.unsigned_abs().clamp(1, 8),
            signed: u32::from(size < 0),
            ..base
        },
        capture,
        capture_len,
    )
}

fn with_type(spec: CaptureSpec, capture: &CaptureRequest, capture_len: u32) -> CaptureSpec {
    let is_string = capture.value_type == ValueType::Str;
    CaptureSpec {
        signed: spec.signed | u32::from(capture.value_type == ValueType::I64 && spec.size == 8),
        string: u32::from(is_string),
        max_len: if is_string {
            capture_len.min(MAX_CAPTURE_STR as u32)
        } else {
            0
        },
        ..spec
    }
}

/// The `request` object of a report: each capture by name.
pub fn render(
    captures: &[CaptureRequest],
    args: &RequestArgs,
    capture_len: u32,
) -> Map<String, Value> {
    let mut request = Map::new();
    for (index, capture) in captures.iter().enumerate().take(MAX_CAPTURES) {
        let raw = args.values[index];
        let value = match capture.value_type {
            ValueType::U64 => Value::from(raw),
            ValueType::I64 => Value::from(raw as i64),
            ValueType::Hex => Value::from(format!("{raw:#x}")),
            ValueType::Str => render_string(&args.strings[index], args.lens[index], capture_len),
        };
        request.insert(capture.name.clone(), value);
    }
    request
}

/// Marker appended to a string cut at `--capture-len`.
pub const TRUNCATED: &str = "…[truncated]";

fn render_string(bytes: &[u8], len: i32, capture_len: u32) -> Value {
    if len < 0 {
        return Value::Null; // the pointer was not readable
    }
    let keep = (len as usize).min(capture_len as usize).min(bytes.len());
    let mut text = escape_controls(&String::from_utf8_lossy(&bytes[..keep]));
    if len as usize > keep {
        text.push_str(TRUNCATED);
    }
    Value::from(text)
}

/// Makes control characters visible (`\n`, `\r`, `\t`, `\xNN`, `\u{NN}`):
/// captured text comes from untrusted traffic and must not break lines,
/// terminals or mail headers downstream.
pub fn escape_controls(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                escaped.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{2028}' || c == '\u{2029}' => {
                escaped.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> CaptureRequest {
        text.parse().unwrap()
    }

    #[test]
    fn parses_named_and_unnamed() {
        let named = parse("query=arg0:str");
        assert_eq!(
            (named.name.as_str(), named.arg, named.value_type),
            ("query", 0, ValueType::Str)
        );
        let unnamed = parse("arg2:hex");
        assert_eq!(
            (unnamed.name.as_str(), unnamed.arg, unnamed.value_type),
            ("arg2", 2, ValueType::Hex)
        );
    }

    #[test]
    fn rejects_bad_captures() {
        assert!(matches!(
            "query=arg0:string".parse::<CaptureRequest>(),
            Err(CaptureError::UnknownType { .. })
        ));
        assert!(matches!(
            "query=0:str".parse::<CaptureRequest>(),
            Err(CaptureError::Syntax { .. })
        ));
        assert!(matches!(
            "arg0".parse::<CaptureRequest>(),
            Err(CaptureError::Syntax { .. })
        ));
        assert!(matches!(
            "bad name=arg0:str".parse::<CaptureRequest>(),
            Err(CaptureError::Syntax { .. })
        ));
        let err = "q=arg0:float"
            .parse::<CaptureRequest>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("str, u64, i64, hex"), "{err}");
    }

    #[test]
    fn sysv_registers() {
        let spec = function_argument(&parse("a=arg0:u64"), 256).unwrap();
        assert_eq!(
            (spec.location, spec.register, spec.size, spec.string),
            (CAPTURE_REGISTER, 14, 8, 0)
        );
        assert_eq!(
            function_argument(&parse("arg5:u64"), 256).unwrap().register,
            8
        );
        let err = function_argument(&parse("arg6:u64"), 256)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first six"), "{err}");
        let string = function_argument(&parse("q=arg1:str"), 300).unwrap();
        assert_eq!(
            (string.register, string.string, string.max_len),
            (13, 1, 300)
        );
    }

    #[test]
    fn usdt_locations() {
        let memory = probe_argument(
            &parse("x=arg0:i64"),
            ArgumentLocation::Memory {
                register: 4,
                displacement: -144,
            },
            -4,
            256,
        );
        assert_eq!(
            (
                memory.location,
                memory.register,
                memory.offset,
                memory.size,
                memory.signed
            ),
            (CAPTURE_MEMORY, 4, -144, 4, 1)
        );
        let constant = probe_argument(&parse("c=arg1:u64"), ArgumentLocation::Constant(5), 8, 256);
        assert_eq!((constant.location, constant.offset), (CAPTURE_CONSTANT, 5));
    }

    fn args_with(strings: &[&[u8]], lens: &[i32], values: &[u64]) -> RequestArgs {
        // SAFETY: all-zero is a valid RequestArgs.
        let mut args: RequestArgs = unsafe { std::mem::zeroed() };
        for (i, s) in strings.iter().enumerate() {
            args.strings[i][..s.len()].copy_from_slice(s);
        }
        args.lens[..lens.len()].copy_from_slice(lens);
        args.values[..values.len()].copy_from_slice(values);
        args
    }

    #[test]
    fn renders_strings_numbers_and_truncation() {
        let captures = [
            parse("q=arg0:str"),
            parse("n=arg1:i64"),
            parse("h=arg2:hex"),
            parse("u=arg3:u64"),
        ];
        let args = args_with(&[b"SELECT 1"], &[8], &[0x1000, (-5i64) as u64, 255, 7]);
        let request = render(&captures, &args, 256);
        assert_eq!(request["q"], "SELECT 1");
        assert_eq!(request["n"], -5);
        assert_eq!(request["h"], "0xff");
        assert_eq!(request["u"], 7);

        // 10 bytes read with a 4-byte capture length: cut and marked.
        let long = args_with(&[b"SELECT 123"], &[10], &[0]);
        let request = render(&captures[..1], &long, 4);
        assert_eq!(request["q"], format!("SELE{TRUNCATED}"));

        let unreadable = args_with(&[], &[-14], &[0]);
        assert!(render(&captures[..1], &unreadable, 256)["q"].is_null());
    }

    #[test]
    fn control_characters_and_bad_utf8_are_made_safe() {
        let captures = [parse("q=arg0:str")];
        let args = args_with(&[b"a\r\nBcc: x@evil\xff\x1b"], &[16], &[0]);
        let request = render(&captures, &args, 256);
        let text = request["q"].as_str().unwrap();
        assert!(!text.contains('\r') && !text.contains('\n'), "{text:?}");
        assert_eq!(text, "a\\r\\nBcc: x@evil\u{fffd}\\x1b");
    }

    #[test]
    fn duplicate_names_and_too_many() {
        assert!(matches!(
            check_all(&[parse("a=arg0:u64"), parse("a=arg1:u64")]),
            Err(CaptureError::DuplicateName { .. })
        ));
        let five: Vec<_> = (0..5).map(|i| parse(&format!("arg{i}:u64"))).collect();
        assert_eq!(check_all(&five), Err(CaptureError::TooMany));
    }
}
