//! Headers-exchange bindings, as RabbitMQ 3.10 matches them
//! (`rabbit_exchange_type_headers.erl`, checked against a live RabbitMQ 3.10.8).
//!
//! * `x-match` defaults to `all`; it must otherwise be a long string `all`, `any`,
//!   `all-with-x` or `any-with-x`, or `queue.bind`/`exchange.bind` fails with channel
//!   error 406 PRECONDITION_FAILED (see [`HeadersArgError`]).
//! * The `x-match` key itself is never matched. Other binding keys starting with `x-`
//!   (case-sensitive; `x-` alone counts) are ignored unless the mode is `all-with-x` or
//!   `any-with-x`. Message header keys are never filtered.
//! * `all` with no (remaining) binding keys matches every message, with or without
//!   headers; `any` with none matches nothing.
//! * A void binding value only tests that the header is present (with any value,
//!   void included).
//! * Otherwise values are compared as RabbitMQ compares the decoded Erlang terms with
//!   `==`, ignoring the field type tag at the top level:
//!   - every integer type (`b B s u I i l`) and timestamp `T` are integers, equal when
//!     numerically equal (short 1 = long 1 = timestamp 1);
//!   - `f` and `d` are floats (a 32-bit float is widened exactly: f32 0.1 ≠ f64 0.1),
//!     and integers equal floats exactly (1 = 1.0, 2^53+1 ≠ 2^53 as a double);
//!     0.0 = -0.0;
//!   - long strings and byte arrays (`x`) are both binaries: equal when bytes are equal;
//!   - booleans are atoms (true ≠ 1, false ≠ 0); decimals are `{scale, value}` pairs
//!     (1.00 as (2,100) ≠ 1.0 as (1,10), and ≠ integer 1);
//!   - arrays and tables compare element by element *including* each element's type
//!     tag (array [short 1] ≠ [long 1], [float 1.0] ≠ [double 1.0], ["x"] ≠ [bytes "x"],
//!     [timestamp 5] ≠ [long 5]); an empty array equals an empty table (both `[]`).
//!
//! Known deviation: RabbitMQ keeps a nested table's entries in wire order, so tables
//! with the same entries in a different order are *not* equal there; our `FieldTable`
//! is a sorted map, so we compare nested tables by key. Top-level headers are sorted by
//! RabbitMQ too, so there is no difference at the top level.

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};

/// How the binding's keys are combined (the `x-match` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchMode {
    /// Every non-`x-` binding key must match (`x-match: all`, the default).
    All,
    /// At least one non-`x-` binding key must match (`x-match: any`).
    Any,
    /// Every binding key, `x-` keys included, must match (`x-match: all-with-x`).
    AllWithX,
    /// At least one binding key, `x-` keys included, must match (`x-match: any-with-x`).
    AnyWithX,
}

/// A compiled headers-exchange binding (from the binding's arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadersBinding {
    mode: MatchMode,
    /// The binding keys that take part in matching, sorted by key.
    keys: Vec<(ShortString, AMQPValue)>,
}

/// Why a headers binding's arguments were refused: RabbitMQ answers channel.close 406.
///
/// `Display` gives RabbitMQ's message exactly (for values RabbitMQ prints on one line);
/// [`HeadersArgError::reply_text`] adds the `PRECONDITION_FAILED - ` prefix.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HeadersArgError {
    /// `x-match` is a long string other than the four modes (e.g. `"ALL"`, `""`).
    #[error("Invalid x-match field value {value}; expected all, any, all-with-x, or any-with-x")]
    InvalidXMatchValue {
        /// The value as Erlang prints it, e.g. `<<"foo">>`.
        value: String,
    },
    /// `x-match` is not a long string (e.g. `signedint`, `binary` for a byte array, `void`).
    #[error("Invalid x-match field type {type_name} (value {value}); expected longstr")]
    InvalidXMatchType {
        /// RabbitMQ's name for the field type, e.g. `signedint`.
        type_name: &'static str,
        /// The value as Erlang prints it, e.g. `1`, `undefined`, `[{longstr,<<"all">>}]`.
        value: String,
    },
}

impl HeadersArgError {
    /// The AMQP reply code RabbitMQ closes the channel with: 406 PRECONDITION_FAILED.
    pub const REPLY_CODE: u16 = 406;

    /// The AMQP reply code RabbitMQ closes the channel with: 406 PRECONDITION_FAILED.
    pub fn reply_code(&self) -> u16 {
        Self::REPLY_CODE
    }

    /// The full `channel.close` reply text, e.g. `PRECONDITION_FAILED - Invalid x-match ...`.
    pub fn reply_text(&self) -> String {
        format!("PRECONDITION_FAILED - {self}")
    }
}

impl HeadersBinding {
    /// Validates and compiles a binding's arguments, as RabbitMQ's `validate_binding` does.
    pub fn parse(args: &FieldTable) -> Result<Self, HeadersArgError> {
        let mode = match args.inner().get("x-match") {
            None => MatchMode::All,
            Some(AMQPValue::LongString(s)) => parse_mode(s.as_bytes())?,
            // Never produced by the wire codec (RabbitMQ has no short strings in tables);
            // accepted like a long string.
            Some(AMQPValue::ShortString(s)) => parse_mode(s.as_str().as_bytes())?,
            Some(other) => {
                let type_name = type_atom(other);
                // Column where Erlang starts printing the value, for its line breaking.
                let col = "Invalid x-match field type ".len() + type_name.len() + " (value ".len();
                return Err(HeadersArgError::InvalidXMatchType { type_name, value: erl_pretty(other, col) });
            }
        };
        let with_x = matches!(mode, MatchMode::AllWithX | MatchMode::AnyWithX);
        let keys = args
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(HeadersBinding { mode, keys })
    }

    /// The binding's match mode.
    pub fn mode(&self) -> MatchMode {
        self.mode
    }

    /// True when a message with these headers (`None`: no headers property) is routed.
    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let key_matches = |(k, pv): &(ShortString, AMQPValue)| match headers.and_then(|h| h.inner().get(k.as_str())) {
            None => false,
            Some(_) if matches!(pv, AMQPValue::Void) => true,
            Some(dv) => term_eq(term(pv), term(dv)),
        };
        match self.mode {
            MatchMode::All | MatchMode::AllWithX => self.keys.iter().all(key_matches),
            MatchMode::Any | MatchMode::AnyWithX => self.keys.iter().any(key_matches),
        }
    }
}

fn parse_mode(s: &[u8]) -> Result<MatchMode, HeadersArgError> {
    match s {
        b"all" => Ok(MatchMode::All),
        b"any" => Ok(MatchMode::Any),
        b"all-with-x" => Ok(MatchMode::AllWithX),
        b"any-with-x" => Ok(MatchMode::AnyWithX),
        other => Err(HeadersArgError::InvalidXMatchValue { value: erl_binary(other) }),
    }
}

/// RabbitMQ's (`rabbit_binary_parser`) name for a field's type.
fn type_atom(v: &AMQPValue) -> &'static str {
    crate::args::type_name(v)
}

/// The Erlang term RabbitMQ decodes a field value to (without its type tag).
#[derive(Debug, Clone, Copy)]
enum Term<'a> {
    Int(i128),
    Float(f64),
    Bin(&'a [u8]),
    Atom(&'static str),
    Decimal(u8, u32),
    Array(&'a [AMQPValue]),
    Table(&'a FieldTable),
}

fn term(v: &AMQPValue) -> Term<'_> {
    match v {
        AMQPValue::Boolean(b) => Term::Atom(if *b { "true" } else { "false" }),
        AMQPValue::ShortShortInt(i) => Term::Int((*i).into()),
        AMQPValue::ShortShortUInt(i) => Term::Int((*i).into()),
        AMQPValue::ShortInt(i) => Term::Int((*i).into()),
        AMQPValue::ShortUInt(i) => Term::Int((*i).into()),
        AMQPValue::LongInt(i) => Term::Int((*i).into()),
        AMQPValue::LongUInt(i) => Term::Int((*i).into()),
        AMQPValue::LongLongInt(i) => Term::Int((*i).into()),
        AMQPValue::Timestamp(i) => Term::Int((*i).into()),
        AMQPValue::Float(f) => Term::Float((*f).into()),
        AMQPValue::Double(f) => Term::Float(*f),
        AMQPValue::DecimalValue(d) => Term::Decimal(d.scale, d.value),
        AMQPValue::ShortString(s) => Term::Bin(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => Term::Bin(s.as_bytes()),
        AMQPValue::ByteArray(b) => Term::Bin(b.as_slice()),
        AMQPValue::FieldArray(a) => Term::Array(a.as_slice()),
        AMQPValue::FieldTable(t) => Term::Table(t),
        AMQPValue::Void => Term::Atom("undefined"),
    }
}

/// Erlang's `==` on the decoded terms.
fn term_eq(a: Term<'_>, b: Term<'_>) -> bool {
    use Term::*;
    match (a, b) {
        (Int(x), Int(y)) => x == y,
        (Float(x), Float(y)) => x == y,
        (Int(i), Float(f)) | (Float(f), Int(i)) => int_eq_float(i, f),
        (Bin(x), Bin(y)) => x == y,
        (Atom(x), Atom(y)) => x == y,
        (Decimal(s1, v1), Decimal(s2, v2)) => s1 == s2 && v1 == v2,
        // Lists of {Type, Value}.
        (Array(x), Array(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(p, q)| type_atom(p) == type_atom(q) && term_eq(term(p), term(q)))
        }
        // Lists of {Key, Type, Value}.
        (Table(x), Table(y)) => {
            x.inner().len() == y.inner().len()
                && x.inner()
                    .iter()
                    .zip(y.inner())
                    .all(|((k1, p), (k2, q))| k1 == k2 && type_atom(p) == type_atom(q) && term_eq(term(p), term(q)))
        }
        // Both are `[]` when empty; otherwise their elements differ in arity.
        (Array(x), Table(y)) | (Table(y), Array(x)) => x.is_empty() && y.inner().is_empty(),
        _ => false,
    }
}

/// Exact integer/float comparison, as Erlang does it.
fn int_eq_float(i: i128, f: f64) -> bool {
    f.is_finite() && f.fract() == 0.0 && f.abs() < 1.0e38 && f as i128 == i
}

/// Erlang's `~p` of a binary: `<<"text">>` when every byte is printable Latin-1, else `<<1,2>>`.
fn erl_binary(b: &[u8]) -> String {
    let printable = |c: u8| matches!(c, 32..=126 | 160..=255 | 8..=13 | 27);
    if b.is_empty() {
        return "<<>>".to_owned();
    }
    if !b.iter().all(|&c| printable(c)) {
        let nums: Vec<String> = b.iter().map(|c| c.to_string()).collect();
        return format!("<<{}>>", nums.join(","));
    }
    let mut out = Vec::with_capacity(b.len() + 6);
    out.extend_from_slice(b"<<\"");
    for &c in b {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            11 => out.extend_from_slice(b"\\v"),
            8 => out.extend_from_slice(b"\\b"),
            12 => out.extend_from_slice(b"\\f"),
            27 => out.extend_from_slice(b"\\e"),
            c => out.push(c),
        }
    }
    out.extend_from_slice(b"\">>");
    // RabbitMQ sends the bytes through unchanged; a reply text must be UTF-8 here.
    String::from_utf8_lossy(&out).into_owned()
}

/// Erlang's shortest round-trip float printing (`io_lib_format:fwrite_g/1`).
fn erl_float(f: f64) -> String {
    if !f.is_finite() {
        // Erlang cannot decode these; never produced by RabbitMQ.
        return format!("{f}");
    }
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if f == 0.0 {
        return format!("{sign}0.0");
    }
    let sci = format!("{:e}", f.abs()); // e.g. "1.2345e5", "1e-5"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let place: i64 = exp.parse::<i64>().expect("exponent") + 1;
    let len = digits.len() as i64;
    let body = if place == 0 {
        format!("0.{digits}")
    } else if place < 0 || place >= len {
        let exp_l = (place - 1).to_string();
        let exp_dot = if len == 1 { 2 } else { 1 };
        let exp_cost = exp_l.len() as i64 + 1 + exp_dot;
        let with_exp = || {
            let (first, rest) = digits.split_at(1);
            let rest = if rest.is_empty() { "0" } else { rest };
            format!("{first}.{rest}e{exp_l}")
        };
        if place < 0 {
            if 2 - place <= exp_cost {
                format!("0.{}{digits}", "0".repeat((-place) as usize))
            } else {
                with_exp()
            }
        } else if place - len + 2 <= exp_cost {
            format!("{digits}{}.0", "0".repeat((place - len) as usize))
        } else {
            with_exp()
        }
    } else {
        let (a, b) = digits.split_at(place as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// Erlang's one-line `~p` of a decoded field value.
fn erl_flat(v: &AMQPValue) -> String {
    match v {
        AMQPValue::FieldArray(a) => {
            let items: Vec<String> = a.as_slice().iter().map(erl_tagged).collect();
            format!("[{}]", items.join(","))
        }
        AMQPValue::FieldTable(t) => {
            let items: Vec<String> = t.inner().iter().map(|(k, v)| erl_keyed(k, v)).collect();
            format!("[{}]", items.join(","))
        }
        other => match term(other) {
            Term::Int(i) => i.to_string(),
            Term::Float(f) => erl_float(f),
            Term::Bin(b) => erl_binary(b),
            Term::Atom(a) => a.to_owned(),
            Term::Decimal(s, v) => format!("{{{s},{v}}}"),
            Term::Array(_) | Term::Table(_) => unreachable!("handled above"),
        },
    }
}

fn erl_tagged(v: &AMQPValue) -> String {
    format!("{{{},{}}}", type_atom(v), erl_flat(v))
}

fn erl_keyed(k: &ShortString, v: &AMQPValue) -> String {
    format!("{{{},{},{}}}", erl_binary(k.as_str().as_bytes()), type_atom(v), erl_flat(v))
}

/// Erlang's `~p` starting at column `col` (Erlang's line length is 80).
///
/// Exact when the value fits on the line; a list that does not fit is broken one
/// element per line, as Erlang does, but elements are not broken further (Erlang's
/// deeper wrapping of long elements is not reproduced).
fn erl_pretty(v: &AMQPValue, col: usize) -> String {
    let flat = erl_flat(v);
    // Observed on RabbitMQ 3.10.8: at column 40, 38 characters stay on one line, 39 do not.
    if col + flat.chars().count() <= 78 {
        return flat;
    }
    let items: Vec<String> = match v {
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(erl_tagged).collect(),
        AMQPValue::FieldTable(t) => t.inner().iter().map(|(k, v)| erl_keyed(k, v)).collect(),
        _ => return flat,
    };
    if items.len() < 2 {
        return flat;
    }
    let sep = format!(",\n{}", " ".repeat(col + 1));
    format!("[{}]", items.join(&sep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{ByteArray, DecimalValue, FieldArray, LongString};

    // Field value constructors, named after the AMQP table type characters.
    fn s_(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }
    fn x(v: &[u8]) -> AMQPValue {
        AMQPValue::ByteArray(ByteArray::from(v))
    }
    fn b(v: i8) -> AMQPValue {
        AMQPValue::ShortShortInt(v)
    }
    fn ub(v: u8) -> AMQPValue {
        AMQPValue::ShortShortUInt(v)
    }
    fn sh(v: i16) -> AMQPValue {
        AMQPValue::ShortInt(v)
    }
    fn u(v: u16) -> AMQPValue {
        AMQPValue::ShortUInt(v)
    }
    fn int(v: i32) -> AMQPValue {
        AMQPValue::LongInt(v)
    }
    fn uint(v: u32) -> AMQPValue {
        AMQPValue::LongUInt(v)
    }
    fn l(v: i64) -> AMQPValue {
        AMQPValue::LongLongInt(v)
    }
    fn f(v: f32) -> AMQPValue {
        AMQPValue::Float(v)
    }
    fn d(v: f64) -> AMQPValue {
        AMQPValue::Double(v)
    }
    fn ts(v: u64) -> AMQPValue {
        AMQPValue::Timestamp(v)
    }
    fn t(v: bool) -> AMQPValue {
        AMQPValue::Boolean(v)
    }
    fn dec(scale: u8, value: u32) -> AMQPValue {
        AMQPValue::DecimalValue(DecimalValue { scale, value })
    }
    fn arr(v: Vec<AMQPValue>) -> AMQPValue {
        AMQPValue::FieldArray(FieldArray::from(v))
    }
    fn tab(kv: &[(&str, AMQPValue)]) -> FieldTable {
        let mut ft = FieldTable::default();
        for (k, v) in kv {
            ft.insert((*k).into(), v.clone());
        }
        ft
    }
    fn ftab(kv: &[(&str, AMQPValue)]) -> AMQPValue {
        AMQPValue::FieldTable(tab(kv))
    }
    const V: AMQPValue = AMQPValue::Void;

    /// (description, binding args, message headers (None: no headers), routed?) —
    /// each row observed on RabbitMQ 3.10.8 (one binding, mandatory publish).
    fn observed() -> Vec<(&'static str, FieldTable, Option<FieldTable>, bool)> {
        vec![
            ("default all, no keys, no headers", tab(&[]), None, true),
            ("all no keys", tab(&[("x-match", s_("all"))]), None, true),
            ("any no keys", tab(&[("x-match", s_("any"))]), None, false),
            ("any no keys, headers", tab(&[("x-match", s_("any"))]), Some(tab(&[("a", s_("1"))])), false),
            ("all only x- keys", tab(&[("x-match", s_("all")), ("x-foo", s_("bar"))]), None, true),
            (
                "any only x- keys",
                tab(&[("x-match", s_("any")), ("x-foo", s_("bar"))]),
                Some(tab(&[("x-foo", s_("bar"))])),
                false,
            ),
            (
                "all-with-x present",
                tab(&[("x-match", s_("all-with-x")), ("x-foo", s_("bar"))]),
                Some(tab(&[("x-foo", s_("bar"))])),
                true,
            ),
            ("all-with-x absent", tab(&[("x-match", s_("all-with-x")), ("x-foo", s_("bar"))]), Some(tab(&[])), false),
            (
                "any-with-x present",
                tab(&[("x-match", s_("any-with-x")), ("x-foo", s_("bar"))]),
                Some(tab(&[("x-foo", s_("bar"))])),
                true,
            ),
            ("all-with-x no keys", tab(&[("x-match", s_("all-with-x"))]), None, true),
            (
                "any-with-x only x-match",
                tab(&[("x-match", s_("any-with-x"))]),
                Some(tab(&[("x-match", s_("any-with-x"))])),
                false,
            ),
            (
                "all-with-x, x-match in headers",
                tab(&[("x-match", s_("all-with-x"))]),
                Some(tab(&[("x-match", s_("zzz"))])),
                true,
            ),
            ("all a=1", tab(&[("a", s_("1"))]), Some(tab(&[("a", s_("1")), ("b", s_("2"))])), true),
            (
                "all missing key",
                tab(&[("a", s_("1")), ("c", s_("3"))]),
                Some(tab(&[("a", s_("1")), ("b", s_("2"))])),
                false,
            ),
            (
                "any one of two",
                tab(&[("x-match", s_("any")), ("a", s_("1")), ("c", s_("3"))]),
                Some(tab(&[("a", s_("1"))])),
                true,
            ),
            ("any wrong value", tab(&[("x-match", s_("any")), ("a", s_("2"))]), Some(tab(&[("a", s_("1"))])), false),
            ("void presence", tab(&[("a", V)]), Some(tab(&[("a", s_("whatever"))])), true),
            ("void presence, absent", tab(&[("a", V)]), Some(tab(&[("b", int(1))])), false),
            ("void header vs string", tab(&[("a", s_("1"))]), Some(tab(&[("a", V)])), false),
            ("void vs void", tab(&[("a", V)]), Some(tab(&[("a", V)])), true),
            (
                "any void presence",
                tab(&[("x-match", s_("any")), ("a", V), ("b", s_("zz"))]),
                Some(tab(&[("a", int(5))])),
                true,
            ),
            ("short 1 vs long 1", tab(&[("a", sh(1))]), Some(tab(&[("a", l(1))])), true),
            ("byte 1 vs unsignedint 1", tab(&[("a", b(1))]), Some(tab(&[("a", uint(1))])), true),
            ("unsignedbyte 1 vs unsignedshort 1", tab(&[("a", ub(1))]), Some(tab(&[("a", u(1))])), true),
            ("signedint 1 vs string \"1\"", tab(&[("a", int(1))]), Some(tab(&[("a", s_("1"))])), false),
            ("int 1 vs double 1.0", tab(&[("a", int(1))]), Some(tab(&[("a", d(1.0))])), true),
            ("int 1 vs float 1.0", tab(&[("a", int(1))]), Some(tab(&[("a", f(1.0))])), true),
            ("float 1.5 vs double 1.5", tab(&[("a", f(1.5))]), Some(tab(&[("a", d(1.5))])), true),
            ("float 0.1 vs double 0.1", tab(&[("a", f(0.1))]), Some(tab(&[("a", d(0.1))])), false),
            ("double 0.0 vs -0.0", tab(&[("a", d(0.0))]), Some(tab(&[("a", d(-0.0))])), true),
            ("int 1 vs bool true", tab(&[("a", int(1))]), Some(tab(&[("a", t(true))])), false),
            ("int 0 vs bool false", tab(&[("a", int(0))]), Some(tab(&[("a", t(false))])), false),
            ("bool true vs bool true", tab(&[("a", t(true))]), Some(tab(&[("a", t(true))])), true),
            ("longstr vs bytearray", tab(&[("a", s_("abc"))]), Some(tab(&[("a", x(b"abc"))])), true),
            ("timestamp 5 vs long 5", tab(&[("a", ts(5))]), Some(tab(&[("a", l(5))])), true),
            // 'L' u64::MAX is decoded by RabbitMQ (and amq-protocol) as long -1.
            ("L max (as long -1) vs long -1", tab(&[("a", l(-1))]), Some(tab(&[("a", l(-1))])), true),
            ("decimal (2,100) vs (1,10)", tab(&[("a", dec(2, 100))]), Some(tab(&[("a", dec(1, 10))])), false),
            ("decimal (2,100) vs (2,100)", tab(&[("a", dec(2, 100))]), Some(tab(&[("a", dec(2, 100))])), true),
            ("decimal (0,1) vs int 1", tab(&[("a", dec(0, 1))]), Some(tab(&[("a", int(1))])), false),
            (
                "array [short 1] vs [long 1]",
                tab(&[("a", arr(vec![sh(1)]))]),
                Some(tab(&[("a", arr(vec![l(1)]))])),
                false,
            ),
            (
                "array [int 1] vs [int 1]",
                tab(&[("a", arr(vec![int(1)]))]),
                Some(tab(&[("a", arr(vec![int(1)]))])),
                true,
            ),
            (
                "array [float 1] vs [double 1]",
                tab(&[("a", arr(vec![f(1.0)]))]),
                Some(tab(&[("a", arr(vec![d(1.0)]))])),
                false,
            ),
            (
                "array [str] vs [bytes]",
                tab(&[("a", arr(vec![s_("x")]))]),
                Some(tab(&[("a", arr(vec![x(b"x")]))])),
                false,
            ),
            (
                "table {k: short 1} vs {k: long 1}",
                tab(&[("a", ftab(&[("k", sh(1))]))]),
                Some(tab(&[("a", ftab(&[("k", l(1))]))])),
                false,
            ),
            (
                "table {k: int 1} vs same",
                tab(&[("a", ftab(&[("k", int(1))]))]),
                Some(tab(&[("a", ftab(&[("k", int(1))]))])),
                true,
            ),
            ("empty string vs empty string", tab(&[("a", s_(""))]), Some(tab(&[("a", s_(""))])), true),
            (
                "long 2^53+1 vs double 2^53",
                tab(&[("a", l((1 << 53) + 1))]),
                Some(tab(&[("a", d(9007199254740992.0))])),
                false,
            ),
            ("long 2^53 vs double 2^53", tab(&[("a", l(1 << 53))]), Some(tab(&[("a", d(9007199254740992.0))])), true),
            (
                "x-match header irrelevant",
                tab(&[("x-match", s_("all")), ("a", s_("1"))]),
                Some(tab(&[("a", s_("1")), ("x-match", s_("any"))])),
                true,
            ),
            ("empty table vs empty array", tab(&[("a", ftab(&[]))]), Some(tab(&[("a", arr(vec![]))])), true),
            ("empty array vs empty table", tab(&[("a", arr(vec![]))]), Some(tab(&[("a", ftab(&[]))])), true),
            ("empty string vs empty array", tab(&[("a", s_(""))]), Some(tab(&[("a", arr(vec![]))])), false),
            (
                "nested double 0.0 vs -0.0",
                tab(&[("a", arr(vec![d(0.0)]))]),
                Some(tab(&[("a", arr(vec![d(-0.0)]))])),
                true,
            ),
            (
                "nested timestamp 5 vs long 5",
                tab(&[("a", arr(vec![ts(5)]))]),
                Some(tab(&[("a", arr(vec![l(5)]))])),
                false,
            ),
            (
                "nested table in array",
                tab(&[("a", arr(vec![ftab(&[("k", s_("v"))])]))]),
                Some(tab(&[("a", arr(vec![ftab(&[("k", s_("v"))])]))])),
                true,
            ),
            ("nested void", tab(&[("a", arr(vec![V]))]), Some(tab(&[("a", arr(vec![V]))])), true),
            (
                "array order matters",
                tab(&[("a", arr(vec![int(1), int(2)]))]),
                Some(tab(&[("a", arr(vec![int(2), int(1)]))])),
                false,
            ),
            ("double 1e300 vs long 2^62", tab(&[("a", d(1e300))]), Some(tab(&[("a", l(1 << 62))])), false),
            (
                "any: x- key present but ignored",
                tab(&[("x-match", s_("any")), ("x-a", s_("1")), ("b", s_("2"))]),
                Some(tab(&[("x-a", s_("1"))])),
                false,
            ),
            (
                "all: wrong x- value ignored",
                tab(&[("x-a", s_("1")), ("b", s_("2"))]),
                Some(tab(&[("x-a", s_("9")), ("b", s_("2"))])),
                true,
            ),
            (
                "all-with-x: x-match not required",
                tab(&[("x-match", s_("all-with-x")), ("b", s_("2"))]),
                Some(tab(&[("b", s_("2"))])),
                true,
            ),
            (
                "all-with-x: wrong x- value",
                tab(&[("x-match", s_("all-with-x")), ("x-a", s_("1")), ("b", s_("2"))]),
                Some(tab(&[("x-a", s_("9")), ("b", s_("2"))])),
                false,
            ),
            ("X- uppercase is not ignored", tab(&[("X-a", s_("1"))]), Some(tab(&[])), false),
            ("key \"x-\" is ignored", tab(&[("x-", s_("1"))]), Some(tab(&[])), true),
            ("key \"x\" is not ignored", tab(&[("x", s_("1"))]), Some(tab(&[])), false),
        ]
    }

    #[test]
    fn matches_like_rabbitmq() {
        for (name, args, headers, want) in observed() {
            let binding = HeadersBinding::parse(&args).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(binding.matches(headers.as_ref()), want, "{name}");
        }
    }

    #[test]
    fn derived_rules() {
        let all = HeadersBinding::parse(&tab(&[("a", int(1)), ("b", V)])).unwrap();
        assert_eq!(all.mode(), MatchMode::All);
        assert!(all.matches(Some(&tab(&[("a", ub(1)), ("b", t(false)), ("c", s_("z"))]))));
        assert!(!all.matches(Some(&tab(&[("a", ub(1))]))));
        assert!(!all.matches(None));
        let any = HeadersBinding::parse(&tab(&[("x-match", s_("any")), ("a", int(1)), ("b", V)])).unwrap();
        assert_eq!(any.mode(), MatchMode::Any);
        assert!(any.matches(Some(&tab(&[("b", V)]))));
        assert!(any.matches(Some(&tab(&[("a", d(1.0))]))));
        assert!(!any.matches(Some(&tab(&[("a", d(1.5))]))));
        assert!(!any.matches(None));
        let anyx = HeadersBinding::parse(&tab(&[("x-match", s_("any-with-x")), ("x-a", V)])).unwrap();
        assert_eq!(anyx.mode(), MatchMode::AnyWithX);
        assert!(anyx.matches(Some(&tab(&[("x-a", int(0))]))));
        assert!(!anyx.matches(Some(&tab(&[("a", int(0))]))));
        // Extreme integers: exact, no wrap-around or float rounding.
        assert!(term_eq(term(&ts(u64::MAX)), term(&ts(u64::MAX))));
        assert!(!term_eq(term(&ts(u64::MAX)), term(&l(-1))));
        assert!(!term_eq(term(&l(i64::MAX)), term(&d(i64::MAX as f64))));
        assert!(term_eq(term(&l(i64::MIN)), term(&d(i64::MIN as f64))));
        assert!(!term_eq(term(&d(f64::NAN)), term(&d(f64::NAN))));
        // Nested tables compare by key (our FieldTable is sorted; see module docs).
        assert!(term_eq(term(&ftab(&[("p", int(1)), ("q", int(2))])), term(&ftab(&[("q", int(2)), ("p", int(1))]))));
        assert!(!term_eq(term(&ftab(&[("p", int(1))])), term(&ftab(&[("p", int(1)), ("q", int(2))]))));
    }

    fn err(v: AMQPValue) -> HeadersArgError {
        HeadersBinding::parse(&tab(&[("x-match", v)])).unwrap_err()
    }

    /// (x-match value, RabbitMQ 3.10.8's reply text after "PRECONDITION_FAILED - ").
    #[test]
    fn invalid_x_match_like_rabbitmq() {
        let e = |s: &str| format!("Invalid x-match field value {s}; expected all, any, all-with-x, or any-with-x");
        let ty = |t: &str, v: &str| format!("Invalid x-match field type {t} (value {v}); expected longstr");
        let cases: Vec<(AMQPValue, String)> = vec![
            (s_("foo"), e(r#"<<"foo">>"#)),
            (s_("ALL"), e(r#"<<"ALL">>"#)),
            (s_(""), e("<<>>")),
            (s_("älle"), e(r#"<<"älle">>"#)),
            (s_("é"), e(r#"<<"é">>"#)),
            (s_("a\"b"), e(r#"<<"a\"b">>"#)),
            (s_("a\\b"), e(r#"<<"a\\b">>"#)),
            (s_("a\nb"), e(r#"<<"a\nb">>"#)),
            (s_("tab\there"), e(r#"<<"tab\there">>"#)),
            (s_("\u{1}"), e("<<1>>")),
            (s_("\u{7f}"), e("<<127>>")),
            (s_(&"x".repeat(120)), e(&format!("<<\"{}\">>", "x".repeat(120)))),
            (int(1), ty("signedint", "1")),
            (x(b"all"), ty("binary", r#"<<"all">>"#)),
            (x(b"\xff\x00"), ty("binary", "<<255,0>>")),
            (x(b""), ty("binary", "<<>>")),
            (V, ty("void", "undefined")),
            (l(5), ty("long", "5")),
            (t(true), ty("bool", "true")),
            (f(1.5), ty("float", "1.5")),
            (f(0.1), ty("float", "0.10000000149011612")),
            (d(1e300), ty("double", "1.0e300")),
            (d(1e21), ty("double", "1.0e21")),
            (d(1e20), ty("double", "1.0e20")),
            (d(1e16), ty("double", "1.0e16")),
            (d(1e15), ty("double", "1.0e15")),
            (d(123456.789), ty("double", "123456.789")),
            (d(1e-5), ty("double", "1.0e-5")),
            (d(0.001), ty("double", "0.001")),
            (d(100.0), ty("double", "100.0")),
            (d(1000.0), ty("double", "1.0e3")),
            (d(0.0), ty("double", "0.0")),
            (d(-0.0), ty("double", "-0.0")),
            (d(0.0001), ty("double", "0.0001")),
            (d(12345.0), ty("double", "12345.0")),
            (d(10.0), ty("double", "10.0")),
            (d(-2.5), ty("double", "-2.5")),
            (ftab(&[("a", int(1))]), ty("table", r#"[{<<"a">>,signedint,1}]"#)),
            (ftab(&[]), ty("table", "[]")),
            (arr(vec![s_("all")]), ty("array", r#"[{longstr,<<"all">>}]"#)),
            (arr(vec![]), ty("array", "[]")),
            (arr(vec![int(1), s_("a")]), ty("array", r#"[{signedint,1},{longstr,<<"a">>}]"#)),
            (dec(2, 100), ty("decimal", "{2,100}")),
            (dec(0, 5), ty("decimal", "{0,5}")),
            (ts(7), ty("timestamp", "7")),
            (u(65535), ty("unsignedshort", "65535")),
            (b(-3), ty("byte", "-3")),
            // Line breaking (the value starts at column 40 for arrays/tables).
            (arr(vec![s_("a"), s_("b")]), ty("array", r#"[{longstr,<<"a">>},{longstr,<<"b">>}]"#)),
            (arr(vec![s_("aa"), s_("b")]), ty("array", r#"[{longstr,<<"aa">>},{longstr,<<"b">>}]"#)),
            (
                arr(vec![s_("aaa"), s_("b")]),
                ty("array", &format!("[{{longstr,<<\"aaa\">>}},\n{}{{longstr,<<\"b\">>}}]", " ".repeat(41))),
            ),
            (
                // RabbitMQ shows wire order (k then j); ours is sorted (j then k).
                ftab(&[("j", t(false)), ("k", V)]),
                ty("table", &format!("[{{<<\"j\">>,bool,false}},\n{}{{<<\"k\">>,void,undefined}}]", " ".repeat(41))),
            ),
        ];
        for (v, want) in cases {
            let got = err(v.clone());
            assert_eq!(got.to_string(), want, "x-match {v:?}");
            assert_eq!(got.reply_code(), 406);
            assert_eq!(got.reply_text(), format!("PRECONDITION_FAILED - {want}"));
        }
    }

    #[test]
    fn valid_x_match_values() {
        for (v, mode) in [
            ("all", MatchMode::All),
            ("any", MatchMode::Any),
            ("all-with-x", MatchMode::AllWithX),
            ("any-with-x", MatchMode::AnyWithX),
        ] {
            assert_eq!(HeadersBinding::parse(&tab(&[("x-match", s_(v))])).unwrap().mode(), mode);
            let short = AMQPValue::ShortString(v.into());
            assert_eq!(HeadersBinding::parse(&tab(&[("x-match", short)])).unwrap().mode(), mode);
        }
        assert_eq!(HeadersBinding::parse(&tab(&[])).unwrap().mode(), MatchMode::All);
    }

    #[test]
    fn erlang_float_printing() {
        for (v, want) in [
            (0.5, "0.5"),
            (1.0, "1.0"),
            (10.0, "10.0"),
            (1.0e4, "1.0e4"),
            (12345.0, "12345.0"),
            (0.0001, "0.0001"),
            (0.00001, "1.0e-5"),
            (0.0012, "0.0012"),
            (1.5e-10, "1.5e-10"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(erl_float(v), want, "{v}");
        }
    }
}
