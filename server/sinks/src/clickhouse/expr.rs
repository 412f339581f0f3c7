//! ClickHouse table options of a registration (`order_by`, `partition_by`, `ttl`), parsed
//! and written again, never pasted.
//!
//! What flows through it: the option text from a registered schema. Out comes the
//! option as Sluice writes it into `CREATE TABLE` (identifiers quoted, strings escaped,
//! every operation parenthesized), or an error naming what is not accepted. Accepted:
//! the table's own columns, numbers, strings, `INTERVAL n UNIT`, arithmetic and
//! comparison operators, `AND`/`OR`/`NOT`, tuples, and calls of the functions in
//! [`FUNCTIONS`] (what keys, partitions and TTLs are made of); for `ttl`, a list of
//! `expr [DELETE [WHERE expr] | TO VOLUME 'v' | TO DISK 'd']`. Anything else (another
//! function, a subquery, a setting, a second statement, a comment) is refused at
//! registration with the reason.

use super::client::quote_ident;

/// Why an option's text is not accepted: the token or construct named, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExprError(pub String);

impl From<String> for ExprError {
    fn from(s: String) -> Self {
        ExprError(s)
    }
}

impl From<&str> for ExprError {
    fn from(s: &str) -> Self {
        ExprError(s.to_string())
    }
}

/// Functions an option may call: date and time bucketing, hashing, casts and the
/// arithmetic ones a key or a TTL is made of.
pub const FUNCTIONS: &[&str] = &[
    "toYYYYMM",
    "toYYYYMMDD",
    "toYYYYMMDDhhmmss",
    "toYear",
    "toMonth",
    "toDate",
    "toDate32",
    "toDateTime",
    "toDateTime64",
    "toStartOfYear",
    "toStartOfQuarter",
    "toStartOfMonth",
    "toMonday",
    "toStartOfWeek",
    "toStartOfDay",
    "toStartOfHour",
    "toStartOfFifteenMinutes",
    "toStartOfTenMinutes",
    "toStartOfFiveMinutes",
    "toStartOfMinute",
    "toStartOfInterval",
    "toUnixTimestamp",
    "toIntervalSecond",
    "toIntervalMinute",
    "toIntervalHour",
    "toIntervalDay",
    "toIntervalWeek",
    "toIntervalMonth",
    "toIntervalYear",
    "now",
    "today",
    "tuple",
    "intHash32",
    "intHash64",
    "cityHash64",
    "sipHash64",
    "xxHash32",
    "xxHash64",
    "murmurHash3_32",
    "murmurHash3_64",
    "farmHash64",
    "intDiv",
    "modulo",
    "plus",
    "minus",
    "multiply",
    "abs",
    "greatest",
    "least",
    "if",
    "multiIf",
    "coalesce",
    "ifNull",
    "assumeNotNull",
    "toString",
    "lower",
    "upper",
    "substring",
    "length",
    "toInt8",
    "toInt16",
    "toInt32",
    "toInt64",
    "toUInt8",
    "toUInt16",
    "toUInt32",
    "toUInt64",
    "toFloat64",
];

const UNITS: &[&str] = &[
    "SECOND", "MINUTE", "HOUR", "DAY", "WEEK", "MONTH", "QUARTER", "YEAR",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Number(String),
    Str(String),
    Punct(&'static str),
}

fn tokenize(text: &str) -> Result<Vec<Tok>, ExprError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(text[s..i].to_string()));
        } else if c == '`' || c == '"' {
            // A quoted identifier: no escapes inside, the quote may not appear.
            let q = b[i];
            let s = i + 1;
            i = s;
            while i < b.len() && b[i] != q {
                i += 1;
            }
            if i == b.len() {
                return Err(ExprError::from("an unterminated quoted name"));
            }
            out.push(Tok::Ident(text[s..i].to_string()));
            i += 1;
        } else if c.is_ascii_digit() {
            let s = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                i += 1;
                if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
                    i += 1;
                }
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let n = &text[s..i];
            if n.matches('.').count() > 1 || n.ends_with(['e', 'E', '+', '-']) {
                return Err(ExprError::from(format!("'{n}' is not a number")));
            }
            out.push(Tok::Number(n.to_string()));
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(ExprError::from("an unterminated string")),
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let e = b
                            .get(i + 1)
                            .ok_or(ExprError::from("an unterminated string"))?;
                        s.push(match e {
                            b'n' => '\n',
                            b't' => '\t',
                            other => *other as char,
                        });
                        i += 2;
                    }
                    Some(_) => {
                        let ch = text[i..].chars().next().expect("a char");
                        s.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            out.push(Tok::Str(s));
        } else {
            const PUNCT: &[&str] = &[
                "<=", ">=", "!=", "<>", "==", "(", ")", ",", "+", "-", "*", "/", "%", "=", "<", ">",
            ];
            let p = PUNCT
                .iter()
                .find(|p| text[i..].starts_with(**p))
                .ok_or_else(|| format!("'{c}' is not accepted"))?;
            out.push(Tok::Punct(p));
            i += p.len();
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    columns: &'a [String],
    depth: usize,
}

/// Deepest nesting accepted in an option.
const MAX_DEPTH: usize = 32;

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(i)) if i.eq_ignore_ascii_case(k))
    }

    fn punct(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::Punct(q)) if *q == p)
    }

    fn expect_punct(&mut self, p: &str) -> Result<(), ExprError> {
        if self.punct(p) {
            self.pos += 1;
            Ok(())
        } else {
            Err(ExprError::from(format!("expected '{p}'")))
        }
    }

    fn expr(&mut self) -> Result<String, ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError::from(format!(
                "nested more than {MAX_DEPTH} deep"
            )));
        }
        let r = self.or();
        self.depth -= 1;
        r
    }

    fn binary(
        &mut self,
        next: fn(&mut Self) -> Result<String, ExprError>,
        ops: &[&str],
        keywords: &[&str],
    ) -> Result<String, ExprError> {
        let mut left = next(self)?;
        loop {
            let op = if let Some(Tok::Punct(p)) = self.peek() {
                ops.iter().find(|o| **o == *p).map(|o| o.to_string())
            } else if let Some(Tok::Ident(i)) = self.peek() {
                keywords
                    .iter()
                    .find(|k| i.eq_ignore_ascii_case(k))
                    .map(|k| k.to_string())
            } else {
                None
            };
            let Some(op) = op else {
                return Ok(left);
            };
            self.pos += 1;
            let right = next(self)?;
            left = format!("({left} {op} {right})");
        }
    }

    fn or(&mut self) -> Result<String, ExprError> {
        self.binary(Self::and, &[], &["OR"])
    }

    fn and(&mut self) -> Result<String, ExprError> {
        self.binary(Self::not, &[], &["AND"])
    }

    fn not(&mut self) -> Result<String, ExprError> {
        if self.keyword("NOT") {
            self.pos += 1;
            let e = self.not()?;
            return Ok(format!("(NOT {e})"));
        }
        self.binary(
            Self::add,
            &["=", "==", "!=", "<>", "<", "<=", ">", ">="],
            &[],
        )
    }

    fn add(&mut self) -> Result<String, ExprError> {
        self.binary(Self::mul, &["+", "-"], &[])
    }

    fn mul(&mut self) -> Result<String, ExprError> {
        self.binary(Self::unary, &["*", "/", "%"], &[])
    }

    fn unary(&mut self) -> Result<String, ExprError> {
        if self.punct("-") {
            self.pos += 1;
            let e = self.unary()?;
            return Ok(format!("(-{e})"));
        }
        self.primary()
    }

    fn list(&mut self) -> Result<Vec<String>, ExprError> {
        let mut items = Vec::new();
        if self.punct(")") {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(self.expr()?);
            if self.punct(",") {
                self.pos += 1;
                continue;
            }
            self.expect_punct(")")?;
            return Ok(items);
        }
    }

    fn primary(&mut self) -> Result<String, ExprError> {
        let tok = self
            .peek()
            .cloned()
            .ok_or(ExprError::from("the expression ends too soon"))?;
        self.pos += 1;
        match tok {
            Tok::Number(n) => Ok(n),
            Tok::Str(s) => Ok(quote_string(&s)),
            Tok::Punct("(") => {
                let items = self.list()?;
                match items.len() {
                    0 => Ok("tuple()".into()),
                    1 => Ok(format!("({})", items[0])),
                    _ => Ok(format!("({})", items.join(", "))),
                }
            }
            Tok::Punct(p) => Err(ExprError::from(format!("'{p}' is not accepted here"))),
            Tok::Ident(name) if name.eq_ignore_ascii_case("INTERVAL") => {
                let n = self.unary()?;
                match self.peek() {
                    Some(Tok::Ident(u)) => {
                        let unit = u.to_ascii_uppercase();
                        let unit = unit.strip_suffix('S').unwrap_or(&unit).to_string();
                        if !UNITS.contains(&unit.as_str()) {
                            return Err(ExprError::from(format!("'{u}' is not an interval unit")));
                        }
                        self.pos += 1;
                        Ok(format!("INTERVAL {n} {unit}"))
                    }
                    _ => Err(ExprError::from("INTERVAL needs a unit (SECOND ... YEAR)")),
                }
            }
            Tok::Ident(name) if self.punct("(") => {
                let f = FUNCTIONS.iter().find(|f| **f == name).ok_or_else(|| {
                    format!(
                        "the function '{name}' is not accepted (accepted: {})",
                        FUNCTIONS.join(", ")
                    )
                })?;
                self.pos += 1;
                let args = self.list()?;
                Ok(format!("{f}({})", args.join(", ")))
            }
            Tok::Ident(name) => {
                if self.columns.contains(&name) {
                    Ok(quote_ident(&name))
                } else {
                    Err(ExprError::from(format!(
                        "'{name}' is not a column of the table"
                    )))
                }
            }
        }
    }
}

fn quote_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for ch in s.chars() {
        match ch {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn parser<'a>(text: &str, columns: &'a [String]) -> Result<Parser<'a>, ExprError> {
    if text.len() > 4096 {
        return Err(ExprError::from("longer than 4096 bytes"));
    }
    Ok(Parser {
        toks: tokenize(text)?,
        pos: 0,
        columns,
        depth: 0,
    })
}

fn finish(p: &Parser<'_>, out: String) -> Result<String, ExprError> {
    match p.peek() {
        None => Ok(out),
        Some(t) => Err(ExprError::from(format!(
            "unexpected {t:?} after the expression"
        ))),
    }
}

/// `order_by` or `partition_by` as Sluice writes it.
pub fn expression(text: &str, columns: &[String]) -> Result<String, ExprError> {
    let mut p = parser(text, columns)?;
    if p.toks.is_empty() {
        return Err(ExprError::from("empty"));
    }
    let e = p.expr()?;
    finish(&p, e)
}

/// `ttl` as Sluice writes it.
pub fn ttl(text: &str, columns: &[String]) -> Result<String, ExprError> {
    let mut p = parser(text, columns)?;
    let mut elements = Vec::new();
    loop {
        let mut e = p.expr()?;
        if p.keyword("DELETE") {
            p.pos += 1;
            e.push_str(" DELETE");
            if p.keyword("WHERE") {
                p.pos += 1;
                e = format!("{e} WHERE {}", p.expr()?);
            }
        } else if p.keyword("TO") {
            p.pos += 1;
            let kind = match p.peek() {
                Some(Tok::Ident(k)) if k.eq_ignore_ascii_case("VOLUME") => "VOLUME",
                Some(Tok::Ident(k)) if k.eq_ignore_ascii_case("DISK") => "DISK",
                _ => {
                    return Err(ExprError::from(
                        "TO must be followed by VOLUME 'name' or DISK 'name'",
                    ))
                }
            };
            p.pos += 1;
            match p.peek().cloned() {
                Some(Tok::Str(s)) => {
                    p.pos += 1;
                    e = format!("{e} TO {kind} {}", quote_string(&s));
                }
                _ => return Err(ExprError::from(format!("TO {kind} needs a quoted name"))),
            }
        }
        elements.push(e);
        if p.punct(",") {
            p.pos += 1;
            continue;
        }
        break;
    }
    finish(&p, elements.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<String> {
        ["timestamp", "service", "trace_id", "order"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn the_seeds_options_are_written_again_quoted() {
        let c = cols();
        assert_eq!(
            expression("(service, timestamp, trace_id)", &c).unwrap(),
            "(`service`, `timestamp`, `trace_id`)"
        );
        assert_eq!(
            expression("toYYYYMM(timestamp)", &c).unwrap(),
            "toYYYYMM(`timestamp`)"
        );
        assert_eq!(expression("tuple()", &c).unwrap(), "tuple()");
        assert_eq!(expression("`order`", &c).unwrap(), "`order`");
        assert_eq!(
            ttl(
                "timestamp + INTERVAL 7 DAY TO VOLUME 'warm', timestamp + INTERVAL 180 DAY DELETE",
                &c
            )
            .unwrap(),
            "(`timestamp` + INTERVAL 7 DAY) TO VOLUME 'warm', (`timestamp` + INTERVAL 180 DAY) DELETE"
        );
        assert_eq!(
            ttl(
                "toDateTime(timestamp) + INTERVAL 1 MONTHS DELETE WHERE service = 'x''y'",
                &c
            )
            .unwrap(),
            "(toDateTime(`timestamp`) + INTERVAL 1 MONTH) DELETE WHERE (`service` = 'x\\'y')"
        );
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let c = cols();
        for (text, why) in [
            (
                "timestamp) ENGINE = Log; DROP TABLE x; --",
                "';' is not accepted",
            ),
            ("timestamp) ENGINE = Log", "unexpected"),
            ("timestamp SETTINGS index_granularity = 1", "unexpected"),
            ("sleep(3)", "function 'sleep' is not accepted"),
            ("(SELECT 1)", "'SELECT' is not a column"),
            ("file('/etc/passwd')", "function 'file' is not accepted"),
            ("nosuch", "'nosuch' is not a column"),
            ("timestamp /* c */", "is not accepted here"),
            ("'unterminated", "unterminated string"),
            ("", "empty"),
            (&"(".repeat(100), "nested more than"),
        ] {
            let e = expression(text, &c).unwrap_err();
            assert!(e.0.contains(why), "{text}: {e}");
        }
        let e = ttl("timestamp + INTERVAL 1 DAY TO TABLE x", &c).unwrap_err();
        assert!(e.0.contains("VOLUME"), "{e}");
        let e = ttl("timestamp + INTERVAL 1 FORTNIGHT DELETE", &c).unwrap_err();
        assert!(e.0.contains("not an interval unit"), "{e}");
    }
}
