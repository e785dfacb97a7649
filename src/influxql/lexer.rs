//! The InfluxQL lexer: text to tokens with byte offsets.
//!
//! Keywords are recognised case-insensitively by the parser from plain identifiers, so
//! the lexer only knows shapes: identifiers (bare or double-quoted), strings (single
//! quotes), numbers, durations (an integer glued to a unit, `10s`, `1700000000000ms`),
//! regular expressions and punctuation. A `/` starts a regular expression only right
//! after `=~` or `!~`, the one place InfluxQL's grammar expects one; anywhere else it is
//! the division operator, which this dialect does not support. Every input yields
//! tokens or an error value with the offset; the lexer never panics and never slices a
//! string off a character boundary.

use super::InfluxqlError;

/// A token's kind and text.
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// An identifier: bare (`mean`, `SELECT`) or double-quoted (`"device"`); `quoted`
    /// tells which, because a quoted identifier is never a keyword.
    Ident {
        /// The name, unescaped.
        name: String,
        /// Written in double quotes.
        quoted: bool,
    },
    /// A single-quoted string, unescaped.
    Str(String),
    /// An integer.
    Int(i64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// A duration, in nanoseconds.
    Duration(i64),
    /// A regular expression between slashes, with `\/` unescaped.
    Regex(String),
    /// `,`
    Comma,
    /// `;`
    Semicolon,
    /// `(`
    LParen,
    /// `)`
    RParen,
    /// `.`
    Dot,
    /// `*`
    Star,
    /// `+`
    Plus,
    /// `-`
    Minus,
    /// `/` (division; unsupported, but named in errors)
    Slash,
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `=~`
    EqRegex,
    /// `!~`
    NeRegex,
    /// `::` (a type cast, unsupported)
    DoubleColon,
    /// The end of the input.
    Eof,
}

impl Tok {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident { name, quoted: true } => format!("\"{name}\""),
            Tok::Ident { name, .. } => name.clone(),
            Tok::Str(s) => format!("'{s}'"),
            Tok::Int(i) => i.to_string(),
            Tok::Float(f) => f.to_string(),
            Tok::Duration(ns) => format!("duration {ns}ns"),
            Tok::Regex(r) => format!("/{r}/"),
            Tok::Comma => ",".into(),
            Tok::Semicolon => ";".into(),
            Tok::LParen => "(".into(),
            Tok::RParen => ")".into(),
            Tok::Dot => ".".into(),
            Tok::Star => "*".into(),
            Tok::Plus => "+".into(),
            Tok::Minus => "-".into(),
            Tok::Slash => "/".into(),
            Tok::Eq => "=".into(),
            Tok::Ne => "!=".into(),
            Tok::Lt => "<".into(),
            Tok::Le => "<=".into(),
            Tok::Gt => ">".into(),
            Tok::Ge => ">=".into(),
            Tok::EqRegex => "=~".into(),
            Tok::NeRegex => "!~".into(),
            Tok::DoubleColon => "::".into(),
            Tok::Eof => "EOF".into(),
        }
    }
}

/// A token and the byte offset where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// What it is.
    pub tok: Tok,
    /// Byte offset in the query text.
    pub pos: usize,
}

/// Duration units and their length in nanoseconds, longest spelling first so that `ms`
/// is not read as `m` followed by `s`.
const UNITS: [(&str, i64); 8] = [
    ("ns", 1),
    ("ms", 1_000_000),
    ("µ", 1_000),
    ("u", 1_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];
const WEEK_NS: i64 = 7 * 86_400_000_000_000;

fn err(pos: usize, msg: impl Into<String>) -> InfluxqlError {
    InfluxqlError::Parse {
        pos,
        msg: msg.into(),
    }
}

/// Split `input` into tokens, ending with [`Tok::Eof`].
pub fn tokenize(input: &str) -> Result<Vec<Token>, InfluxqlError> {
    let mut out: Vec<Token> = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some(&(pos, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        // `-- comment` to the end of the line.
        if input[pos..].starts_with("--") {
            while chars.next_if(|&(_, c)| c != '\n').is_some() {}
            continue;
        }
        let regex_expected = matches!(
            out.last(),
            Some(Token {
                tok: Tok::EqRegex | Tok::NeRegex,
                ..
            })
        );
        let tok = match c {
            '"' | '\'' => {
                chars.next();
                let text = quoted(&mut chars, c, pos)?;
                if c == '"' {
                    Tok::Ident {
                        name: text,
                        quoted: true,
                    }
                } else {
                    Tok::Str(text)
                }
            }
            '/' if regex_expected => {
                chars.next();
                Tok::Regex(regex(&mut chars, pos)?)
            }
            '0'..='9' => number(input, &mut chars, pos)?,
            '.' if input[pos + 1..].starts_with(|c: char| c.is_ascii_digit()) => {
                number(input, &mut chars, pos)?
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut end = pos;
                while let Some((i, c)) = chars.next_if(|&(_, c)| c.is_alphanumeric() || c == '_') {
                    end = i + c.len_utf8();
                }
                Tok::Ident {
                    name: input[pos..end].to_owned(),
                    quoted: false,
                }
            }
            _ => {
                chars.next();
                let next = chars.peek().map(|&(_, c)| c);
                let mut two = |t: Tok| {
                    chars.next();
                    t
                };
                match (c, next) {
                    ('=', Some('~')) => two(Tok::EqRegex),
                    ('!', Some('~')) => two(Tok::NeRegex),
                    ('!', Some('=')) => two(Tok::Ne),
                    ('<', Some('>')) => two(Tok::Ne),
                    ('<', Some('=')) => two(Tok::Le),
                    ('>', Some('=')) => two(Tok::Ge),
                    (':', Some(':')) => two(Tok::DoubleColon),
                    ('=', _) => Tok::Eq,
                    ('<', _) => Tok::Lt,
                    ('>', _) => Tok::Gt,
                    (',', _) => Tok::Comma,
                    (';', _) => Tok::Semicolon,
                    ('(', _) => Tok::LParen,
                    (')', _) => Tok::RParen,
                    ('.', _) => Tok::Dot,
                    ('*', _) => Tok::Star,
                    ('+', _) => Tok::Plus,
                    ('-', _) => Tok::Minus,
                    ('/', _) => Tok::Slash,
                    (other, _) => return Err(err(pos, format!("unexpected character {other:?}"))),
                }
            }
        };
        out.push(Token { tok, pos });
    }
    out.push(Token {
        tok: Tok::Eof,
        pos: input.len(),
    });
    Ok(out)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

/// The rest of a quoted identifier or string after its opening `quote`. Backslash
/// escapes the quote, a backslash, and `n`/`t`; other escapes keep the backslash.
fn quoted(chars: &mut Chars<'_>, quote: char, start: usize) -> Result<String, InfluxqlError> {
    let mut s = String::new();
    loop {
        match chars.next() {
            None => return Err(err(start, "unterminated quoted text")),
            Some((_, c)) if c == quote => return Ok(s),
            Some((_, '\\')) => match chars.next() {
                Some((_, c)) if c == quote || c == '\\' => s.push(c),
                Some((_, 'n')) => s.push('\n'),
                Some((_, 't')) => s.push('\t'),
                Some((_, c)) => {
                    s.push('\\');
                    s.push(c);
                }
                None => return Err(err(start, "unterminated quoted text")),
            },
            Some((_, '\n')) => return Err(err(start, "newline in quoted text")),
            Some((_, c)) => s.push(c),
        }
    }
}

/// The rest of a regular expression after its opening `/`: `\/` is a slash, every other
/// escape is kept for the regex engine.
fn regex(chars: &mut Chars<'_>, start: usize) -> Result<String, InfluxqlError> {
    let mut s = String::new();
    loop {
        match chars.next() {
            None => return Err(err(start, "unterminated regular expression")),
            Some((_, '/')) => return Ok(s),
            Some((_, '\\')) => match chars.next() {
                Some((_, '/')) => s.push('/'),
                Some((_, c)) => {
                    s.push('\\');
                    s.push(c);
                }
                None => return Err(err(start, "unterminated regular expression")),
            },
            Some((_, c)) => s.push(c),
        }
    }
}

/// A number, or an integer glued to a duration unit.
fn number(input: &str, chars: &mut Chars<'_>, pos: usize) -> Result<Tok, InfluxqlError> {
    let mut end = pos;
    let mut is_float = false;
    while let Some((i, c)) = chars.next_if(|&(_, c)| c.is_ascii_digit() || c == '.') {
        is_float |= c == '.';
        end = i + 1;
    }
    // An exponent: `1e5`, `2.5E-3`.
    let rest = &input[end..];
    let mut exp_len = 0;
    if let Some(after) = rest.strip_prefix(['e', 'E']) {
        let signed = after.strip_prefix(['+', '-']).unwrap_or(after);
        let digits = signed.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            exp_len = 1 + (after.len() - signed.len()) + digits;
        }
    }
    if exp_len > 0 {
        for _ in 0..exp_len {
            chars.next();
        }
        end += exp_len;
        is_float = true;
    }
    let text = &input[pos..end];
    if is_float {
        return text
            .parse::<f64>()
            .map(Tok::Float)
            .map_err(|_| err(pos, format!("invalid number {text}")));
    }
    let value: i64 = text
        .parse()
        .map_err(|_| err(pos, format!("integer {text} out of range")))?;
    // A unit glued to the digits makes a duration.
    let rest = &input[end..];
    for (unit, ns) in UNITS.iter().chain(std::iter::once(&("w", WEEK_NS))) {
        if let Some(after) = rest.strip_prefix(unit) {
            if after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue;
            }
            for _ in unit.chars() {
                chars.next();
            }
            return value
                .checked_mul(*ns)
                .map(Tok::Duration)
                .ok_or_else(|| err(pos, format!("duration {text}{unit} out of range")));
        }
    }
    if rest.starts_with(|c: char| c.is_alphabetic() || c == '_') {
        return Err(err(end, format!("invalid duration unit after {text}")));
    }
    Ok(Tok::Int(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s)
            .expect("lexes")
            .into_iter()
            .map(|t| t.tok)
            .collect()
    }

    fn ident(s: &str, quoted: bool) -> Tok {
        Tok::Ident {
            name: s.into(),
            quoted,
        }
    }

    #[test]
    fn grafana_shapes_lex() {
        assert_eq!(
            toks(
                r#"SELECT mean("v") FROM "t" WHERE "device" =~ /^a\/b$/ AND time >= 1700000000000ms and time <= now() - 6h"#
            ),
            vec![
                ident("SELECT", false),
                ident("mean", false),
                Tok::LParen,
                ident("v", true),
                Tok::RParen,
                ident("FROM", false),
                ident("t", true),
                ident("WHERE", false),
                ident("device", true),
                Tok::EqRegex,
                Tok::Regex("^a/b$".into()),
                ident("AND", false),
                ident("time", false),
                Tok::Ge,
                Tok::Duration(1_700_000_000_000_000_000),
                ident("and", false),
                ident("time", false),
                Tok::Le,
                ident("now", false),
                Tok::LParen,
                Tok::RParen,
                Tok::Minus,
                Tok::Duration(6 * 3_600_000_000_000),
                Tok::Eof,
            ]
        );
        assert_eq!(
            toks("'it\\'s' 1.5 2e3 10 1u 5µ <> != ::"),
            vec![
                Tok::Str("it's".into()),
                Tok::Float(1.5),
                Tok::Float(2000.0),
                Tok::Int(10),
                Tok::Duration(1_000),
                Tok::Duration(5_000),
                Tok::Ne,
                Tok::Ne,
                Tok::DoubleColon,
                Tok::Eof,
            ]
        );
    }

    #[test]
    fn bad_input_is_an_error_with_a_position() {
        for (text, pos) in [
            ("'open", 0),
            ("\"open", 0),
            ("a =~ /open", 5),
            ("99999999999999999999", 0),
            ("10x", 2),
            ("a # b", 2),
            ("99999999999h", 0),
        ] {
            match tokenize(text) {
                Err(InfluxqlError::Parse { pos: p, .. }) => assert_eq!(p, pos, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
